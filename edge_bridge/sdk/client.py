"""The asynchronous SDK client: batch records per stream and deliver them to the bridge.

Data path, all on one event loop and without a task per record::

    publish()/send() --validate--> per-stream pending batch --seal--> send queue
        --> max_in_flight sender tasks --POST, retry--> bridge --200--> futures

A batch is *sealed* when it reaches ``batch_max_records`` or
``batch_max_bytes``, when ``linger_ms`` has passed since its first record, or
on :meth:`EdgeClient.flush`. Sealing gives it the next request sequence of this
producer and encodes it once; every retry resends exactly those bytes, so the
bridge's ``(producer, request_seq)`` de-duplication makes retries store nothing
twice. A record's future resolves only when the bridge has answered 200, i.e.
once the record is durable in the bridge's buffer.

When the bridge is away (connection refused, 5xx, or full with ``Retry-After``)
requests are retried with backoff until ``retry_timeout_s``; the client logs the
outage once (``sdk_bridge_unavailable``, a warning) and its end once
(``sdk_bridge_available``: how long, how many requests and retries), counts it
in :attr:`ClientStats.outages`, and logs each retry only at debug level. It logs
through the standard library, on the ``edge_bridge.sdk.client`` logger, and
never to stdout (:mod:`edge_bridge.sdk._log`).
``close`` waits at most ``close_timeout_s`` for what is pending; then it fails
those records with :class:`~broker.errors.ClosedError` (code
``not_acknowledged``) and returns, so an application can always shut down.
Nothing is dropped silently: every record's future ends acknowledged or failed,
and a record sent without one (``send``) that fails is counted, logged with its
batch, and raised by the next ``flush``/``close`` (:class:`SendFailed`).
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
import uuid
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Final

import msgspec

from broker.errors import BufferFull, ClosedError
from broker.protocol.ingress import CONTENT_TYPE, MAX_PRODUCER_CHARS
from broker.protocol.wire import CT_JSON
from edge_bridge.sdk._batch import OutgoingBatch, Waiter
from edge_bridge.sdk._defaults import (
    DEFAULT_BATCH_MAX_BYTES,
    DEFAULT_BATCH_MAX_RECORDS,
    DEFAULT_CLOSE_TIMEOUT_S,
    DEFAULT_LINGER_MS,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_PENDING_BYTES,
    DEFAULT_MAX_PENDING_RECORDS,
    DEFAULT_MAX_RECORD_BYTES,
    DEFAULT_REQUEST_TIMEOUT_S,
    DEFAULT_RETRY_TIMEOUT_S,
    DEFAULT_URL,
    MAX_RETRY_TIMEOUT_S,
    WIRE_RECORD_OVERHEAD_BYTES,
    Default,
    require,
)
from edge_bridge.sdk._delivery import Delivery
from edge_bridge.sdk._http import HttpxPoster, Poster, StreamPoster
from edge_bridge.sdk._log import LOGGER_NAME, EventLogger
from edge_bridge.sdk._records import OutRecord, Preparer, encode_request, plain_json
from edge_bridge.sdk._settling import BatchBook
from edge_bridge.sdk.results import ClientStats, RecordAck

if TYPE_CHECKING:
    import httpx

__all__ = [
    "EdgeClient",
]

_log = EventLogger(LOGGER_NAME)

_Future: Final = asyncio.Future
"""Built directly: ``loop.create_future()`` adds a Python call per record."""
_json_encode: Final = msgspec.json.Encoder().encode
_now_ns: Final = time.time_ns
_OVERHEAD: Final = WIRE_RECORD_OVERHEAD_BYTES


class _State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


_OPEN: Final = _State.OPEN
"""A module global: ``publish`` checks it per record, cheaper than the enum lookup."""


class EdgeClient(BatchBook):
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
        close_timeout_s: how long ``close`` (and leaving ``async with``) waits
            for the bridge to acknowledge pending records; then they fail with
            :class:`ClosedError` (code ``not_acknowledged``: they may or may
            not be stored) and ``close`` returns. ``None`` waits as long as the
            retries go on (``retry_timeout_s`` per request).
        max_pending_records: records published but not yet confirmed beyond
            which ``publish`` raises :class:`BufferFull`.
        max_pending_bytes: bytes of records (as batches are sized) published
            but not yet confirmed beyond which ``publish`` raises
            :class:`BufferFull`; with ``max_pending_records``, bounds memory
            whatever the records' size.
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
        close_timeout_s: float | None = DEFAULT_CLOSE_TIMEOUT_S,
        max_pending_records: int = DEFAULT_MAX_PENDING_RECORDS,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        transport: httpx.AsyncBaseTransport | None = None,
        token: str | None = None,
    ) -> None:
        if producer_id is None:
            producer_id = uuid.uuid4().hex
        if not isinstance(producer_id, str) or not 1 <= len(producer_id) <= MAX_PRODUCER_CHARS:
            raise ValueError(f"producer_id must be a string of 1..{MAX_PRODUCER_CHARS} characters")
        require(batch_max_records >= 1, "batch_max_records must be >= 1")
        require(batch_max_bytes >= 1, "batch_max_bytes must be >= 1")
        require(math.isfinite(linger_ms) and linger_ms >= 0, "linger_ms must be >= 0")
        require(max_in_flight >= 1, "max_in_flight must be >= 1")
        require(max_record_bytes >= 1, "max_record_bytes must be >= 1")
        require(
            0 <= retry_timeout_s <= MAX_RETRY_TIMEOUT_S,
            f"retry_timeout_s must be within 0..{MAX_RETRY_TIMEOUT_S:g}",
        )
        require(request_timeout_s > 0, "request_timeout_s must be > 0")
        require(
            close_timeout_s is None or (math.isfinite(close_timeout_s) and close_timeout_s >= 0),
            "close_timeout_s must be >= 0 or None",
        )
        require(max_pending_records >= 1, "max_pending_records must be >= 1")
        require(max_pending_bytes >= 1, "max_pending_bytes must be >= 1")
        # Caught here: an unsupported scheme would otherwise look like a
        # transport error and be retried for retry_timeout_s.
        require(url.startswith(("http://", "https://")), f"url must be http(s)://..., got {url!r}")

        super().__init__(producer=producer_id, stats=ClientStats())
        self._batch_max_records = batch_max_records
        self._batch_max_bytes = batch_max_bytes
        self._linger_s = linger_ms / 1000.0
        self._max_in_flight = max_in_flight
        self._preparer = preparer = Preparer(max_record_bytes)
        self._prepare = preparer.prepare
        """Validates and converts one record (pure but for a cache, so the synchronous
        wrapper calls it from application threads)."""
        self._inline_max_bytes = preparer.inline_max_bytes
        self._retry_timeout_s = retry_timeout_s
        self._close_timeout_s = close_timeout_s
        self._max_pending = max_pending_records
        self._max_pending_bytes = max_pending_bytes
        # Time-based start: see ``producer_id`` above. One process cannot
        # seal a batch per microsecond, so a restart starts above its past.
        self._next_request_seq = time.time_ns() // 1000
        # The bridge is local: no HTTP(S)_PROXY is consulted (one meant for
        # internet traffic must not silently route records through a proxy).
        http: Poster
        if transport is None:
            http = StreamPoster(url, content_type=CONTENT_TYPE,
                                      timeout_s=request_timeout_s, max_connections=max_in_flight,
                                      token=token)
        else:
            http = HttpxPoster(url, transport=transport, content_type=CONTENT_TYPE,
                                     timeout_s=request_timeout_s, token=token)

        self._state = _State.OPEN
        self._loop: asyncio.AbstractEventLoop | None = None
        self._release_task: asyncio.Task[None] | None = None
        self._delivery = Delivery(http, producer=producer_id, max_in_flight=max_in_flight,
                                  retry_timeout_s=retry_timeout_s, stats=self.stats,
                                  settler=self)

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
        # the application was told they would be (within close_timeout_s).
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

    async def flush(self, timeout: float | None = None) -> None:
        """Send every pending batch now and wait until all records are settled.

        Settled means confirmed or failed. A ``publish`` record's failure is
        delivered through its future (and counted in ``stats.records_failed``),
        not raised here; the failures of ``send`` records are: once everything
        is settled, ``flush`` raises :class:`SendFailed` if any record sent
        with ``send`` failed since the previous ``flush`` (each failure is
        reported once). Cancelling ``flush`` cancels only the wait.

        Args:
            timeout: seconds to wait at most; ``None`` waits until every
                request is settled (each retries for up to ``retry_timeout_s``).

        Raises:
            TimeoutError: records were still unsettled after ``timeout``
                seconds; they stay pending and sending goes on (``send``
                failures so far stay for the next ``flush``).
            SendFailed: ``send`` records failed since the last ``flush``.
        """
        await self._settle_pending(timeout)
        self._raise_send_failures()

    async def _settle_pending(self, timeout: float | None) -> None:
        for batch in list(self._pending.values()):
            self._seal(batch)
        waits = [batch.done for batch in self._unresolved if batch.done is not None]
        if not waits:
            return
        _, unsettled = await asyncio.wait(waits, timeout=timeout)
        if unsettled:
            raise TimeoutError(
                f"{self._outstanding} records not settled within {timeout:g} s; sending goes on"
            )

    async def close(self, timeout: float | Default | None = Default.TIMEOUT) -> None:
        """Flush for at most ``timeout`` seconds, then release the connections. Idempotent.

        ``publish`` and ``send`` raise :class:`ClosedError` from the moment
        ``close`` is called. Records the bridge has not acknowledged when the
        timeout expires (the bridge is down, or slower than the timeout) fail
        with :class:`ClosedError` whose ``code`` is ``not_acknowledged``: the
        bridge may or may not have stored them. They are counted in
        ``stats.records_unacknowledged`` and logged once
        (``sdk_records_unacknowledged``). If ``close`` is cancelled, it falls
        back to :meth:`abort`, so connections are released and no future is
        left pending.

        Args:
            timeout: seconds to wait for acknowledgements; by default the
                client's ``close_timeout_s``; ``None`` waits as long as the
                retries go on.

        Raises:
            SendFailed: once the client is closed, if records sent with
                ``send`` failed since the last ``flush`` (including those the
                close timeout failed); a later ``close`` does not repeat it.
                ``publish`` records report through their futures only.
        """
        if self._state is _State.CLOSED:
            self._raise_send_failures()
            return
        self._state = _State.CLOSING
        wait_s = self._close_timeout_s if isinstance(timeout, Default) else timeout
        try:
            try:
                await self._settle_pending(wait_s)
            except TimeoutError:
                assert wait_s is not None  # None waits, it never times out
                outage = self._delivery.outage
                self._fail_unacknowledged(
                    wait_s, outage.problem if outage.since is not None else "no answer yet")
        finally:
            await self.abort()
        self._raise_send_failures()

    async def abort(self) -> None:
        """Close without waiting: fail every unconfirmed record with :class:`ClosedError`.

        Records that were in flight may nevertheless have been stored by the
        bridge; their futures say only that this client no longer knows.
        ``abort`` does not raise for ``send`` records it fails: they are
        counted and logged, and the next :meth:`close` raises
        :class:`SendFailed` for them.
        """
        if self._state is _State.OPEN:
            self._state = _State.CLOSING
        error = "client closed before the bridge confirmed the record (it may or may not be stored)"
        records = self._fail_all(lambda: ClosedError(error))
        if records:
            _log.warning("sdk_records_aborted", producer=self._producer, records=records)
        if self._release_task is None:
            self._release_task = asyncio.ensure_future(self._release())
        # Shielded: a cancelled caller must not leave sockets half-closed.
        await asyncio.shield(self._release_task)

    async def _release(self) -> None:
        await self._delivery.aclose()
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
        instead of failing the batch it would have travelled in. An
        application that needs no future per record uses :meth:`send`,
        which costs less.

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
        future: asyncio.Future[RecordAck] = _Future(loop=self._loop or self._bind_loop())
        self._add(stream, payload, key, ts, headers, waiter=future)
        return future

    def send(
        self,
        stream: str,
        payload: object,
        *,
        key: str | None = None,
        ts: object = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Queue one record for ``stream``, fire-and-forget: no future, failures in bulk.

        Arguments, validation, batching, ordering, retries and back-pressure
        are those of :meth:`publish`; only the per-record future is left out,
        which makes ``send`` the cheaper call for an application that does not
        wait for each record. Its failures are never silent: every failed
        record is counted (``stats.records_failed``, ``stats.sent_records_failed``,
        ``stats.failed_by_reason``), each failed batch is logged once
        (``sdk_batch_failed``), and the next :meth:`flush` or :meth:`close`
        raises :class:`SendFailed` for them. Wait for durability with
        ``flush``: when it returns without raising, every record sent before
        it is durable at the bridge.

        Raises:
            InvalidInput: bad stream name, key, headers, ts or payload type.
            RecordTooLarge: the payload exceeds ``max_record_bytes``.
            BufferFull: ``max_pending_records`` records await confirmation.
            ClosedError: the client is closing or closed.
        """
        # The hot path: the common record (plain_json) into its stream's open batch,
        # which exists only while the client is open (close and abort seal or fail
        # every pending batch first), when it fits; anything else takes _add's way.
        batch = self._pending.get(stream) if type(stream) is str else None
        if batch is not None and ts is None and headers is None and (
                data := plain_json(payload, key, self._inline_max_bytes)) is not None:
            nbytes = batch.nbytes + len(data) + (_OVERHEAD if key is None else _OVERHEAD + len(key))
            if nbytes <= self._batch_max_bytes and self._outstanding < self._max_pending and (
                    self._outstanding_bytes < self._max_pending_bytes):
                (records := batch.records).append((_now_ns() // 1000, CT_JSON, data, key, None))
                batch.unwaited += 1
                self._outstanding_bytes += nbytes - batch.nbytes
                batch.nbytes = nbytes
                self._outstanding += 1
                (stats := self.stats).records_published += 1
                stats.records_sent += 1
                if len(records) >= self._batch_max_records or nbytes >= self._batch_max_bytes:
                    self._seal(batch)
                return
        self._add(stream, payload, key, ts, headers, waiter=None)
        self.stats.records_sent += 1

    def _add(self, stream: str, payload: object, key: object, ts: object, headers: object, *,
             waiter: Waiter | None) -> None:
        """Validate one record and queue it, with its future or without (``send``)."""
        if self._state is not _OPEN:
            raise ClosedError("EdgeClient is closed; it accepts no more records")
        record, nbytes = self._prepare(stream, payload, key, ts, headers)
        if self._full():
            raise self._buffer_full(self._outstanding)
        if self._loop is None:
            self._bind_loop()
        self._enqueue(stream, record, nbytes, waiter)

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

    def _enqueue(self, stream: str, record: OutRecord, nbytes: int,
                 waiter: Waiter | None) -> None:
        """Append a prepared record to its stream's batch (sealing what is full)."""
        batch = self._pending.get(stream)
        if batch is None or batch.nbytes + nbytes > self._batch_max_bytes:
            batch = self._next_batch(stream, batch)
        batch.records.append(record)
        if waiter is None:
            batch.unwaited += 1
        else:
            if batch.unwaited:
                batch.mark_gap()
            batch.waiters.append(waiter)
        batch.nbytes += nbytes
        self._outstanding += 1
        self._outstanding_bytes += nbytes
        self.stats.records_published += 1
        if len(batch.records) >= self._batch_max_records or batch.nbytes >= self._batch_max_bytes:
            self._seal(batch)

    def _submit(self, items: Iterable[tuple[str, OutRecord, int, Waiter | None]]) -> None:
        """Append prepared records (loop thread only; used by the synchronous wrapper).

        The caller has already checked capacity; a client closed in between
        fails the records instead of raising, because nobody is there to catch:
        a waiter gets :class:`ClosedError`, a record without one is counted as
        failed (and reported by ``close``).
        """
        refused = sent = appended = 0
        pending = self._pending
        for stream, record, nbytes, waiter in items:
            if waiter is None:
                sent += 1
                # As in send: straight into the stream's open batch when it fits.
                batch = pending.get(stream)
                if batch is not None and (total := batch.nbytes + nbytes) <= self._batch_max_bytes:
                    (records := batch.records).append(record)
                    batch.unwaited += 1
                    batch.nbytes = total
                    appended += 1
                    self._outstanding_bytes += nbytes
                    if len(records) >= self._batch_max_records or total >= self._batch_max_bytes:
                        self._seal(batch)
                    continue
            if self._state is _OPEN:
                self._enqueue(stream, record, nbytes, waiter)
            elif waiter is not None:
                waiter.set_exception(ClosedError("EdgeClient closed before the record was queued"))
            else:
                refused += 1
        self._outstanding += appended
        self.stats.records_published += appended
        self.stats.records_sent += sent
        if refused:
            error = ClosedError("EdgeClient closed before the record was queued")
            self._count_failed(refused, refused, error.code, error)
            _log.warning("sdk_records_aborted", producer=self._producer, records=refused)

    def _full(self, waiting: int = 0) -> bool:
        """Whether ``max_pending_records`` or ``max_pending_bytes`` is reached (counting
        ``waiting`` more records handed over but not queued yet)."""
        return (self._outstanding + waiting >= self._max_pending
                or self._outstanding_bytes >= self._max_pending_bytes)

    def _buffer_full(self, waiting: int) -> BufferFull:
        return BufferFull(
            f"{waiting} records ({self._outstanding_bytes} bytes) await confirmation by "
            f"the bridge (max_pending_records={self._max_pending}, "
            f"max_pending_bytes={self._max_pending_bytes}); retry later",
            retry_after=self._delivery.backpressure_hint_s,
        )

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("EdgeClient is bound to another event loop")
        return loop

    # -- batching ---------------------------------------------------------------------------

    def _next_batch(self, stream: str, full: OutgoingBatch | None) -> OutgoingBatch:
        """Seal ``full`` (the stream's pending batch, if the next record does not fit)
        and open the stream's next batch."""
        if full is not None:
            self._seal(full)
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
        assert self._loop is not None
        if self._pending.get(batch.stream) is batch:
            del self._pending[batch.stream]
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        batch.request_seq = self._next_request_seq
        self._next_request_seq += 1
        batch.body = encode_request(self._producer, batch.request_seq, batch.records)
        # Only the encoded body is needed from now on; dropping the records
        # roughly halves the memory a backlog holds.
        batch.records = []
        batch.done = self._loop.create_future()
        self._unresolved.add(batch)
        self._delivery.send(batch, self._loop)
