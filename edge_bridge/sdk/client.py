"""The asynchronous SDK client: batch records per stream and deliver them to the bridge.

Data path, all on one event loop and without a task per record::

    publish() --validate--> per-stream pending batch --seal--> send queue
        --> max_in_flight sender tasks --POST, retry--> bridge --200--> futures

A batch is *sealed* when it reaches ``batch_max_records`` or
``batch_max_bytes``, when ``linger_ms`` has passed since its first record, or
on :meth:`EdgeClient.flush`. Sealing gives it the next request sequence of this
producer and encodes it once; every retry resends exactly those bytes, so the
bridge's ``(producer, request_seq)`` de-duplication makes retries store nothing
twice. A record's future resolves only when the bridge has answered 200, i.e.
once the record is durable in the bridge's buffer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import functools
import math
import random
import time
import uuid
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Final

import httpx
import msgspec
import structlog

from broker.errors import BufferFull, ClosedError, RecordTooLarge, TemporaryError
from broker.protocol.ingress import (
    CONTENT_TYPE,
    MAX_PRODUCER_CHARS,
    IngressRequest,
    IngressResponse,
    check_headers,
    check_key,
    encode_payload,
    records_path,
    to_ts_us,
)
from broker.protocol.tokens import validate_token
from broker.protocol.wire import CT_RAW, Record
from edge_bridge.sdk._answers import decode_ack, rejection, retry_after_s
from edge_bridge.sdk._batch import OutgoingBatch, Waiter
from edge_bridge.sdk._defaults import (
    BACKOFF_INITIAL_S,
    BACKOFF_MAX_S,
    DEFAULT_BATCH_MAX_BYTES,
    DEFAULT_BATCH_MAX_RECORDS,
    DEFAULT_LINGER_MS,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_PENDING_RECORDS,
    DEFAULT_MAX_RECORD_BYTES,
    DEFAULT_REQUEST_TIMEOUT_S,
    DEFAULT_RETRY_TIMEOUT_S,
    DEFAULT_URL,
    MAX_RETRY_TIMEOUT_S,
    WIRE_RECORD_OVERHEAD_BYTES,
)
from edge_bridge.sdk.results import ClientStats, RecordAck

__all__ = [
    "EdgeClient",
]

log = structlog.get_logger(__name__)

_KNOWN_STREAMS_MAX: Final = 10_000
"""Validated stream names remembered to skip the regex; bounded like all caches."""
_INVALID_STATE: Final = (asyncio.InvalidStateError, concurrent.futures.InvalidStateError)

_encoder = msgspec.msgpack.Encoder()


class _State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class EdgeClient:
    """Publishes records to a local edge bridge, batching per stream.

    Use it as ``async with EdgeClient(...) as client:``; all methods must be
    called from the event loop the client first ran on. ``publish`` is cheap
    and synchronous; durability is signalled by the future it returns.

    Records of one stream are stored in publish order within a batch; with
    ``max_in_flight > 1`` two batches of one stream may be stored in either
    order (and a retried batch after a later one). Set ``max_in_flight=1``
    when the order of ``seq`` across batches must follow publish order.

    Args:
        url: the bridge's base URL (``http://host:port``).
        producer_id: identifies this producer for de-duplication (1..128
            characters); a random id by default. Request sequences start from
            the current time in microseconds, so a process that restarts with
            the same ``producer_id`` never repeats an earlier request's id.
        batch_max_records: seal a batch at this many records.
        batch_max_bytes: seal a batch before it would exceed this many bytes
            (payload + key + headers + ~16 bytes per record); a single larger
            record travels alone.
        linger_ms: seal a batch this long after its first record; bounds the
            latency batching adds. 0 sends what was published in the same
            event-loop iteration.
        max_in_flight: requests outstanding at the bridge at once (overall).
        max_record_bytes: largest payload accepted by ``publish``; keep it at
            or below the bridge's ``max_record_bytes``.
        retry_timeout_s: give up retrying a request this long after its first
            attempt; at most 300 s, since the bridge remembers request ids
            for 10 minutes.
        request_timeout_s: per-attempt connect/read/write timeout.
        max_pending_records: records published but not yet confirmed beyond
            which ``publish`` raises :class:`BufferFull`; bounds memory.
        transport: an httpx transport to use instead of the network (tests).
        token: this producer's token, when the bridge requires one
            (``bridge.producer_tokens``; docs/ingress-http.md).

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        producer_id: str | None = None,
        batch_max_records: int = DEFAULT_BATCH_MAX_RECORDS,
        batch_max_bytes: int = DEFAULT_BATCH_MAX_BYTES,
        linger_ms: float = DEFAULT_LINGER_MS,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        retry_timeout_s: float = DEFAULT_RETRY_TIMEOUT_S,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        max_pending_records: int = DEFAULT_MAX_PENDING_RECORDS,
        transport: httpx.AsyncBaseTransport | None = None,
        token: str | None = None,
    ) -> None:
        if producer_id is None:
            producer_id = uuid.uuid4().hex
        if not isinstance(producer_id, str) or not 1 <= len(producer_id) <= MAX_PRODUCER_CHARS:
            raise ValueError(f"producer_id must be a string of 1..{MAX_PRODUCER_CHARS} characters")
        _require(batch_max_records >= 1, "batch_max_records must be >= 1")
        _require(batch_max_bytes >= 1, "batch_max_bytes must be >= 1")
        _require(math.isfinite(linger_ms) and linger_ms >= 0, "linger_ms must be >= 0")
        _require(max_in_flight >= 1, "max_in_flight must be >= 1")
        _require(max_record_bytes >= 1, "max_record_bytes must be >= 1")
        _require(
            0 <= retry_timeout_s <= MAX_RETRY_TIMEOUT_S,
            f"retry_timeout_s must be within 0..{MAX_RETRY_TIMEOUT_S:g}",
        )
        _require(request_timeout_s > 0, "request_timeout_s must be > 0")
        _require(max_pending_records >= 1, "max_pending_records must be >= 1")
        base_url = httpx.URL(url)
        # Caught here: an unsupported scheme would otherwise look like a
        # transport error and be retried for retry_timeout_s.
        _require(base_url.scheme in ("http", "https"), f"url must be http(s)://..., got {url!r}")

        self.stats = ClientStats()
        self._producer = producer_id
        self._batch_max_records = batch_max_records
        self._batch_max_bytes = batch_max_bytes
        self._linger_s = linger_ms / 1000.0
        self._max_in_flight = max_in_flight
        self._max_record_bytes = max_record_bytes
        self._retry_timeout_s = retry_timeout_s
        self._max_pending = max_pending_records
        # Time-based start: see ``producer_id`` above. One process cannot
        # seal a batch per microsecond, so a restart starts above its past.
        self._next_request_seq = time.time_ns() // 1000
        self._http = httpx.AsyncClient(
            base_url=base_url,
            transport=transport,
            timeout=httpx.Timeout(request_timeout_s),
            limits=httpx.Limits(
                max_connections=max_in_flight, max_keepalive_connections=max_in_flight
            ),
            headers={"Content-Type": CONTENT_TYPE,
                     **({"Authorization": f"Bearer {token}"} if token else {})},
            # The bridge is local: an HTTP(S)_PROXY meant for internet traffic
            # must not silently route records through a proxy.
            trust_env=False,
        )

        self._state = _State.OPEN
        self._loop: asyncio.AbstractEventLoop | None = None
        self._known_streams: set[str] = set()
        self._pending: dict[str, OutgoingBatch] = {}
        self._unresolved: set[OutgoingBatch] = set()
        self._outstanding = 0
        self._send_queue: asyncio.Queue[OutgoingBatch] | None = None
        self._senders: list[asyncio.Task[None]] = []
        self._release_task: asyncio.Task[None] | None = None
        self._backpressure_hint_s = BACKOFF_INITIAL_S

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> EdgeClient:
        if self._state is not _State.OPEN:
            raise ClosedError("EdgeClient is closed; create a new one")
        self._bind_loop()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Records already accepted are delivered even when the block failed:
        # the application was told they would be.
        await self.close()

    @property
    def producer_id(self) -> str:
        """The producer id the bridge de-duplicates this client's requests by."""
        return self._producer

    @property
    def max_pending_records(self) -> int:
        """Records published but not yet confirmed beyond which ``publish`` refuses."""
        return self._max_pending

    @property
    def closed(self) -> bool:
        """True once ``close`` or ``abort`` has begun."""
        return self._state is not _State.OPEN

    async def flush(self) -> None:
        """Send every pending batch now and wait until all published records are settled.

        Settled means confirmed or failed: failures are delivered through the
        records' futures (and counted in ``stats.records_failed``), not raised
        here. Cancelling ``flush`` cancels only the wait.
        """
        for batch in list(self._pending.values()):
            self._seal(batch)
        waits = [batch.done for batch in self._unresolved if batch.done is not None]
        if waits:
            await asyncio.wait(waits)

    async def close(self) -> None:
        """Flush, then release the connections. Idempotent.

        ``publish`` raises :class:`ClosedError` from the moment ``close`` is
        called. If ``close`` is cancelled, it falls back to :meth:`abort`, so
        connections are released and no future is left pending.
        """
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSING
        try:
            await self.flush()
        finally:
            await self.abort()

    async def abort(self) -> None:
        """Close without waiting: fail every unconfirmed record with :class:`ClosedError`.

        Records that were in flight may nevertheless have been stored by the
        bridge; their futures say only that this client no longer knows.
        """
        if self._state is _State.OPEN:
            self._state = _State.CLOSING
        error = "client closed before the bridge confirmed the record (it may or may not be stored)"
        for batch in list(self._pending.values()):
            self._fail(batch, lambda: ClosedError(error))
        for batch in list(self._unresolved):
            self._fail(batch, lambda: ClosedError(error))
        if self._release_task is None:
            self._release_task = asyncio.ensure_future(self._release())
        # Shielded: a cancelled caller must not leave sockets half-closed.
        await asyncio.shield(self._release_task)

    async def _release(self) -> None:
        for task in self._senders:
            task.cancel()
        await asyncio.gather(*self._senders, return_exceptions=True)
        self._senders.clear()
        await self._http.aclose()
        self._state = _State.CLOSED

    # -- publishing -------------------------------------------------------------------------

    def publish(
        self,
        stream: str,
        payload: object,
        *,
        key: str | None = None,
        ts: object = None,
        headers: dict[str, str] | None = None,
    ) -> asyncio.Future[RecordAck]:
        """Queue one record for ``stream``; the returned future resolves once it is durable.

        Validation happens here, synchronously, so a bad record fails alone
        instead of failing the batch it would have travelled in.

        Args:
            stream: stream name, ``[A-Za-z0-9_-]{1,64}``.
            payload: ``bytes``-like (sent raw) or anything JSON-encodable.
            key: optional record key (at most 1024 characters).
            ts: event time: ``datetime`` (naive = UTC), seconds since the epoch,
                or ``None`` for now.
            headers: optional ``str -> str`` metadata.

        Returns:
            A future resolving to the record's :class:`RecordAck`, or failing
            with :class:`InvalidInput` (the bridge rejected the batch),
            :class:`BufferFull` (the bridge stayed full until the retry
            deadline), :class:`TemporaryError` (the bridge was unreachable
            until the deadline; the record may or may not be stored) or
            :class:`ClosedError` (aborted). A failure nobody retrieves is
            logged once per batch as ``sdk_batch_failed``, not per record.
            Cancelling the future does not withdraw the record.

        Raises:
            InvalidInput: bad stream name, key, headers, ts or payload type.
            RecordTooLarge: the payload exceeds ``max_record_bytes``.
            BufferFull: ``max_pending_records`` records await confirmation.
            ClosedError: the client is closing or closed.
        """
        if self._state is not _State.OPEN:
            raise ClosedError("EdgeClient is closed; publish is no longer possible")
        record, nbytes = self._prepare(stream, payload, key, ts, headers)
        if self._outstanding >= self._max_pending:
            raise self._buffer_full(self._outstanding)
        loop = self._loop if self._loop is not None else self._bind_loop()
        future: asyncio.Future[RecordAck] = loop.create_future()
        self._append(stream, record, nbytes, future)
        return future

    async def publish_wait(
        self,
        stream: str,
        payload: object,
        *,
        key: str | None = None,
        ts: object = None,
        headers: dict[str, str] | None = None,
    ) -> RecordAck:
        """``await publish(...)``: publish one record and wait until it is durable."""
        return await self.publish(stream, payload, key=key, ts=ts, headers=headers)

    def _prepare(
        self, stream: str, payload: object, key: object, ts: object, headers: object
    ) -> tuple[Record, int]:
        """Validate and convert one record; returns it with its batch-size charge.

        Pure (touches only immutable settings and a set), so the synchronous
        wrapper calls it from application threads.
        """
        if type(stream) is not str or stream not in self._known_streams:
            validate_token("stream name", stream)
            if len(self._known_streams) < _KNOWN_STREAMS_MAX:
                self._known_streams.add(stream)
        # Fast path for the most common payload; the helper handles the rest.
        if type(payload) is bytes:
            ct, data = CT_RAW, payload
        else:
            ct, data = encode_payload(payload)
        if len(data) > self._max_record_bytes:
            raise RecordTooLarge(
                f"payload of {len(data)} bytes exceeds max_record_bytes={self._max_record_bytes}"
            )
        nbytes = len(data) + WIRE_RECORD_OVERHEAD_BYTES
        ts_us = time.time_ns() // 1000 if ts is None else to_ts_us(ts)
        checked_key = None if key is None else check_key(key)
        if checked_key is not None:
            nbytes += len(checked_key)
        checked_headers = None if headers is None else check_headers(headers)
        if checked_headers is not None:
            nbytes += sum(len(name) + len(value) + 2 for name, value in checked_headers.items())
        return Record(ts_us, ct, data, checked_key, checked_headers), nbytes

    def _submit(self, items: Iterable[tuple[str, Record, int, Waiter]]) -> None:
        """Append prepared records (loop thread only; used by the synchronous wrapper).

        The caller has already checked capacity; a client closed in between
        fails the waiters instead of raising, because nobody is there to catch.
        """
        append = self._append
        for stream, record, nbytes, waiter in items:
            if self._state is _State.OPEN:
                append(stream, record, nbytes, waiter)
            else:
                waiter.set_exception(ClosedError("EdgeClient closed before the record was queued"))

    def _append(self, stream: str, record: Record, nbytes: int, waiter: Waiter) -> None:
        batch = self._pending.get(stream)
        if batch is None:
            batch = self._open_batch(stream)
        elif batch.nbytes + nbytes > self._batch_max_bytes:
            self._seal(batch)
            batch = self._open_batch(stream)
        batch.records.append(record)
        batch.waiters.append(waiter)
        batch.nbytes += nbytes
        self._outstanding += 1
        self.stats.records_published += 1
        if len(batch.records) >= self._batch_max_records or batch.nbytes >= self._batch_max_bytes:
            self._seal(batch)

    def _buffer_full(self, waiting: int) -> BufferFull:
        return BufferFull(
            f"{waiting} records await confirmation by the bridge "
            f"(max_pending_records={self._max_pending}); retry later",
            retry_after=self._backpressure_hint_s,
        )

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._send_queue = asyncio.Queue()
        elif self._loop is not loop:
            raise RuntimeError("EdgeClient is bound to another event loop")
        return loop

    # -- batching ---------------------------------------------------------------------------

    def _open_batch(self, stream: str) -> OutgoingBatch:
        assert self._loop is not None
        batch = OutgoingBatch(stream)
        self._pending[stream] = batch
        if self._linger_s > 0:
            batch.timer = self._loop.call_later(self._linger_s, self._linger_expired, batch)
        else:
            batch.timer = self._loop.call_soon(self._linger_expired, batch)
        return batch

    def _linger_expired(self, batch: OutgoingBatch) -> None:
        if self._pending.get(batch.stream) is batch:
            self._seal(batch)

    def _seal(self, batch: OutgoingBatch) -> None:
        """Give the batch its request id, encode it once, and queue it for sending."""
        assert self._loop is not None and self._send_queue is not None
        if self._pending.get(batch.stream) is batch:
            del self._pending[batch.stream]
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        batch.request_seq = self._next_request_seq
        self._next_request_seq += 1
        batch.body = _encoder.encode(
            IngressRequest(self._producer, batch.request_seq, batch.records)
        )
        # Only the encoded body is needed from now on; dropping the Record
        # objects roughly halves the memory a backlog holds.
        batch.records = []
        batch.done = self._loop.create_future()
        self._unresolved.add(batch)
        self._send_queue.put_nowait(batch)
        if not self._senders:
            self._senders = [
                self._loop.create_task(self._send_forever(), name=f"edgesync-sdk-sender-{i}")
                for i in range(self._max_in_flight)
            ]

    # -- sending ----------------------------------------------------------------------------

    async def _send_forever(self) -> None:
        """One of ``max_in_flight`` senders: the pool size is the in-flight limit."""
        assert self._send_queue is not None
        while True:
            batch = await self._send_queue.get()
            try:
                await self._deliver(batch)
            except asyncio.CancelledError:
                self._fail(batch, lambda: ClosedError("client aborted while sending the record"))
                raise
            except Exception as exc:  # a bug here must not leave futures pending forever
                log.exception("sdk_sender_failed", producer=self._producer, stream=batch.stream)
                self._fail(batch, functools.partial(_same, exc))

    async def _deliver(self, batch: OutgoingBatch) -> None:
        """Send one sealed batch until it is confirmed, rejected, or its deadline passes."""
        assert self._loop is not None
        loop = self._loop
        path = records_path(batch.stream)
        deadline = loop.time() + self._retry_timeout_s
        backoff = BACKOFF_INITIAL_S
        attempt = 0
        while True:
            attempt += 1
            self.stats.requests_sent += 1
            retry_after: float | None = None
            try:
                response = await self._http.post(path, content=batch.body)
            except httpx.RequestError as exc:
                # Connection refused/reset, timeouts, a response lost mid-way:
                # the bridge may or may not have stored the batch. Resending
                # the same request id is safe either way.
                problem = f"{type(exc).__name__}: {exc}"
            else:
                status = response.status_code
                if status == 200:
                    ack = decode_ack(response.content, len(batch.waiters))
                    if ack is not None:
                        self._resolve(batch, ack)
                        return
                    # Retrying is safe (the bridge answers a repeat with the
                    # original ack) and cures a garbled response.
                    problem = f"malformed 200 answer: {response.content[:200]!r}"
                elif status in (429, 503) and (retry_after := retry_after_s(response)) is not None:
                    problem = f"bridge buffer full (HTTP {status}), retry after {retry_after:g} s"
                    self._backpressure_hint_s = retry_after
                elif 400 <= status < 500 and status != 408:
                    self._fail(batch, functools.partial(rejection, response))
                    return
                else:
                    problem = f"HTTP {status}: {response.content[:200]!r}"
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._give_up(batch, attempt, problem, retry_after)
                return
            if retry_after is not None:
                # Back-pressure: wait as told, plus a little jitter so blocked
                # producers do not all return in the same millisecond.
                delay = retry_after * random.uniform(1.0, 1.1)
            else:
                delay = random.uniform(backoff / 2, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            delay = min(delay, remaining)
            self.stats.retries += 1
            log.info(
                "sdk_request_retried",
                producer=self._producer,
                stream=batch.stream,
                request_seq=batch.request_seq,
                records=len(batch.waiters),
                attempt=attempt,
                delay_s=round(delay, 3),
                reason=problem,
            )
            await asyncio.sleep(delay)

    def _give_up(
        self, batch: OutgoingBatch, attempts: int, problem: str, retry_after: float | None
    ) -> None:
        timeout = self._retry_timeout_s
        if retry_after is not None:
            message = f"bridge buffer still full after {timeout:g} s ({attempts} attempts)"
            self._fail(batch, lambda: BufferFull(message, retry_after=retry_after))
        else:
            message = (
                f"bridge unreachable for {timeout:g} s ({attempts} attempts; last: {problem}); "
                "the records may or may not be stored"
            )
            self._fail(batch, lambda: TemporaryError(message, delay=BACKOFF_MAX_S))

    # -- settling ---------------------------------------------------------------------------

    def _resolve(self, batch: OutgoingBatch, ack: IngressResponse) -> None:
        if batch.settled:
            return
        stream, epoch, first_seq = batch.stream, ack.epoch, ack.first_seq
        for i, waiter in enumerate(batch.waiters):
            # No done() check first: on a concurrent future it takes a lock,
            # and a future is cancelled rarely; set_result refuses those.
            try:
                waiter.set_result(RecordAck(stream, epoch, first_seq + i))
            except _INVALID_STATE:
                continue
        self.stats.records_acked += len(batch.waiters)
        self._settle(batch)

    def _fail(self, batch: OutgoingBatch, make_error: Callable[[], BaseException]) -> None:
        """Fail every record of ``batch``, each with its own exception instance.

        Separate instances, because an exception raised in many places (and
        threads) at once would grow one shared traceback.
        """
        if batch.settled:
            return
        for waiter in batch.waiters:
            try:
                waiter.set_exception(make_error())
            except _INVALID_STATE:  # cancelled by the application
                continue
            # Mark it retrieved: a fire-and-forget publisher gets the one log
            # line below, not one "exception never retrieved" per record.
            waiter.exception()
        error = make_error()
        self.stats.records_failed += len(batch.waiters)
        log.error(
            "sdk_batch_failed",
            producer=self._producer,
            stream=batch.stream,
            request_seq=batch.request_seq,
            records=len(batch.waiters),
            error_type=type(error).__name__,
            error=str(error),
        )
        self._settle(batch)

    def _settle(self, batch: OutgoingBatch) -> None:
        batch.settled = True
        self._outstanding -= len(batch.waiters)
        batch.waiters = []
        batch.records = []
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        if self._pending.get(batch.stream) is batch:
            del self._pending[batch.stream]
        self._unresolved.discard(batch)
        if batch.done is not None and not batch.done.done():
            batch.done.set_result(None)


def _same(exc: BaseException) -> BaseException:
    return exc


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
