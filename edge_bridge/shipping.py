"""The shipper: reads the oldest unshipped records, packs batches and publishes them.

Streams are served by priority (higher first). Each publish carries a
``Nats-Msg-Id`` derived from the batch's identity range and a secret of the process
(:func:`broker.protocol.wire.msg_id`), so a retried publish of the same batch is
absorbed by JetStream's duplicate window, and the batch is
retried with its original boundaries until it is acknowledged. At most
``max_in_flight`` batches are held in memory, whatever the backlog on disk.

Flow control: at most ``max_unconfirmed_bytes`` (all streams) may be shipped or in
flight without the cloud's committed watermark covering them. While the ingest or
PostgreSQL is down the shipper stops there instead of shipping the whole backlog,
and each retransmission round ships that window again, not the backlog.

The shipped watermark of a stream is "everything below the oldest batch still
in flight": it tolerates gaps left by dropped records and never runs ahead of
an unacknowledged batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from nats.js import JetStreamContext

from broker.backoff import backoff_s
from broker.protocol.topology import Topology
from broker.protocol.wire import compress_body, encode_batch_parts, msg_id
from broker.settings import ShipperSettings, StreamPolicy
from edge_bridge.buffer import Buffer, StoredRun
from edge_bridge.metrics import BridgeMetrics

__all__ = ["BATCH_OVERHEAD_BYTES", "Shipper", "TooLarge", "message_bytes"]

log = structlog.get_logger(__name__)

_HEADER_BLOCK_BYTES = len(b"NATS/1.0\r\n\r\n")
BATCH_OVERHEAD_BYTES = 128 * 1024
"""A bound on a batch message's bytes beyond its records' payloads and ``batch_max_bytes``:
the envelope, a record's key (at most 1 KiB) and headers (at most 64 KiB), the message's
NATS headers."""


class TooLarge(Exception):
    """A batch is a bigger message than the connected nats-server takes."""


def message_bytes(body: bytes, headers: dict[str, str]) -> int:
    """What nats-server counts against its ``max_payload`` for a message: the body and
    the header block nats-py writes (``NATS/1.0``, ``Name: value`` lines, a blank
    line). nats-py checks the body alone; a message whose headers pushed it over the
    limit reached the server, which closed the connection (and nats-py gave it up)."""
    return len(body) + _HEADER_BLOCK_BYTES + sum(
        len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())




@dataclass(slots=True)
class _StreamCursor:
    epoch: int
    read_upto: int
    """Highest seq handed to a publish task."""
    in_flight: dict[int, int] = field(default_factory=dict)
    """first_seq -> last_seq of batches published but not yet acknowledged."""
    uncommitted: deque[tuple[int, float, int]] = field(default_factory=deque)
    """(last_seq, acked_at, bytes) of batches JetStream acked but Postgres has not
    committed."""
    unconfirmed_bytes: int = 0
    """Bytes of the batches in flight or in ``uncommitted``."""
    cloud_upto: int = 0
    """Highest watermark the cloud reported for this epoch, applied or not (after a
    restart it may lie above what this bridge shipped since: not applied until the
    shipper got there, yet those seqs need no room in the window)."""
    retransmit_factor: float = 1.0
    """Doubles with each retransmission that brought no progress; 1 after progress."""
    generation: int = 0
    """Retransmission rounds so far; part of the message id of re-sent batches."""
    shipped_high: int = 0
    """Highest :meth:`shipped_upto` ever reached; unlike it, a retransmission does not
    lower it (what JetStream once acknowledged was shipped)."""
    next_expiry_check: float = 0.0

    def shipped_upto(self) -> int:
        if self.in_flight:
            return min(self.in_flight) - 1
        return self.read_upto


class Shipper:
    """Moves records from the buffer to JetStream; one per bridge."""

    def __init__(
        self,
        buffer: Buffer,
        *,
        edge_id: str,
        topology: Topology,
        settings: ShipperSettings,
        policy_for: Callable[[str], StreamPolicy],
        metrics: BridgeMetrics,
        publish_timeout_s: float,
    ) -> None:
        # Public: the watermark follower and the drop reporter work on what this shipper
        # ships, so they take these from it rather than being handed them again.
        self.buffer, self.edge_id, self.topology = buffer, edge_id, topology
        self.salt = secrets.token_hex(8)
        """Of every ``Nats-Msg-Id`` this process publishes (:func:`msg_id` says why); a
        restarted bridge's first publishes are then not de-duplicated by JetStream, and
        the ingest's idempotent write absorbs them instead."""
        self.settings = settings
        self._policy_for = policy_for
        self._metrics = metrics
        self._publish_timeout = publish_timeout_s
        self._cursors: dict[str, _StreamCursor] = {}
        self._unconfirmed_bytes = 0
        """Sum of the cursors' ``unconfirmed_bytes`` (see ``max_unconfirmed_bytes``)."""
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._js: JetStreamContext | None = None
        self._max_payload: int | None = None
        self._connected = asyncio.Event()
        self._link_changed = asyncio.Event()

    def attach(self, js: JetStreamContext | None, *, max_payload: int | None = None) -> None:
        """Give the shipper a JetStream context, or None while disconnected: then no new
        batches are read (so none queue up behind a dead link, where they would
        delay higher-priority records once it heals). ``max_payload``: the largest
        message the server takes (its INFO), headers included."""
        self._js = js
        if max_payload is not None:
            self._max_payload = max_payload
        if js is None:
            self._connected.clear()
        else:
            self._connected.set()
        # Wake publishes that are backing off: the link they waited for has changed.
        self._link_changed.set()
        self._link_changed = asyncio.Event()

    @property
    def unconfirmed_bytes(self) -> int:
        """Bytes shipped or in flight that no committed watermark covers yet (bounded
        by ``max_unconfirmed_bytes``)."""
        return self._unconfirmed_bytes

    def begin_shutdown(self) -> None:
        self._stopping = True
        self.buffer.appended.set()

    def _cursor(self, stream: str) -> _StreamCursor | None:
        state = self.buffer.stream_state(stream)
        if state is None:
            return None
        cursor = self._cursors.get(stream)
        if cursor is None or cursor.epoch != state.epoch:
            if cursor is not None:
                self._unconfirmed_bytes -= cursor.unconfirmed_bytes
            start = max(state.shipped_seq, state.committed_seq)
            cursor = _StreamCursor(epoch=state.epoch, read_upto=start)
            self._cursors[stream] = cursor
        return cursor

    def shipped_high(self, stream: str, epoch: int) -> int:
        """Every seq of ``stream``/``epoch`` up to this was shipped by this bridge (or was
        absent when read: dropped). What a committed watermark may claim at most."""
        state = self.buffer.stream_state(stream)
        if state is None or state.epoch != epoch:
            return 0
        cursor = self._cursors.get(stream)
        high = cursor.shipped_high if cursor is not None and cursor.epoch == epoch else 0
        # Trimmed before a restart: it was shipped (and committed) then.
        return max(high, state.committed_seq)

    def on_committed(self, stream: str, epoch: int, watermark: int) -> None:
        """The cloud committed everything of ``stream``/``epoch`` up to ``watermark``."""
        cursor = self._cursors.get(stream)
        if cursor is None or cursor.epoch != epoch:
            return
        # A batch in flight that this covers (a retransmitted copy, the first one
        # committed meanwhile) needs no room once acked: remembered, as for a watermark
        # seen but not applied. Else its bytes held the window until a retransmission
        # round, itself spurious, and doubled the stream's retransmit timeout.
        cursor.cloud_upto = max(cursor.cloud_upto, watermark)
        progressed = False
        while cursor.uncommitted and cursor.uncommitted[0][0] <= watermark:
            self._confirmed(cursor, cursor.uncommitted.popleft()[2])
            progressed = True
        if progressed:
            cursor.retransmit_factor = 1.0
            self.buffer.appended.set()  # room in the window: the main loop may read again
        if watermark > cursor.read_upto and not cursor.in_flight:
            cursor.read_upto = watermark

    def on_watermark_seen(self, stream: str, epoch: int, watermark: int) -> None:
        """The cloud reports ``watermark`` for ``stream``/``epoch``, which the follower
        cannot apply yet (above what this bridge shipped since it started). Batches up
        to it no longer hold room in the ``max_unconfirmed_bytes`` window: the shipper
        must ship up to it again before the buffer may be trimmed, and a window that
        waited for that watermark would wait for ever."""
        cursor = self._cursors.get(stream)
        if cursor is None or cursor.epoch != epoch or watermark <= cursor.cloud_upto:
            return
        cursor.cloud_upto = watermark
        while cursor.uncommitted and cursor.uncommitted[0][0] <= watermark:
            self._confirmed(cursor, cursor.uncommitted.popleft()[2])
        self.buffer.appended.set()

    def _maybe_retransmit(self, stream: str, cursor: _StreamCursor, now: float) -> None:
        """Ship again what JetStream acked but Postgres never committed in time."""
        if not cursor.uncommitted or cursor.in_flight:
            return
        timeout = min(self.settings.retransmit_backoff_max_s,
                      self.settings.retransmit_timeout_s * cursor.retransmit_factor)
        if now - cursor.uncommitted[0][1] < timeout:
            return
        state = self.buffer.stream_state(stream)
        if state is None:
            return
        log.warning(
            "records_retransmitted", stream=stream, epoch=cursor.epoch,
            from_seq=state.committed_seq + 1, to_seq=cursor.read_upto,
            uncommitted_for_s=round(now - cursor.uncommitted[0][1], 1),
        )
        self._metrics.retransmissions.inc()
        cursor.read_upto = state.committed_seq
        self._confirmed(cursor, sum(entry[2] for entry in cursor.uncommitted))
        cursor.uncommitted.clear()
        cursor.retransmit_factor *= 2
        cursor.generation += 1
        self.buffer.rewind_shipped(stream)

    async def _expire(self, stream: str, cursor: _StreamCursor, now: float) -> None:
        ttl = self._policy_for(stream).ttl_s
        if ttl is None or now < cursor.next_expiry_check:
            return
        cursor.next_expiry_check = now + min(1.0, ttl / 10)
        await self.buffer.expire(stream, after_seq=cursor.read_upto, ttl_s=ttl)

    def _idle_tick_s(self) -> float:
        return max(0.05, min(1.0, self.settings.retransmit_timeout_s / 4))

    async def _expire_all(self) -> None:
        now = time.monotonic()
        for stream in self.buffer.stream_names():
            cursor = self._cursor(stream)
            if cursor is not None:
                await self._expire(stream, cursor, now)

    async def run_forever(self) -> None:
        """Ship until :meth:`begin_shutdown`; then wait for in-flight batches briefly."""
        try:
            while not self._stopping:
                if not self._connected.is_set():
                    # Disconnected: still expire records past their TTL, so an outage
                    # frees their space and they are never shipped late.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._connected.wait(), timeout=1.0)
                    await self._expire_all()
                    continue
                if self._stopping:
                    break
                self.buffer.appended.clear()
                progressed = await self._ship_round()
                if not progressed:
                    # Idle: wake on new records, or periodically for TTL and retransmits.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.buffer.appended.wait(),
                                               timeout=self._idle_tick_s())
                    woken = self.buffer.appended.is_set()
                    if woken and not self._stopping and self.settings.linger_ms > 0:
                        # Let a trickle accumulate into a fuller batch.
                        await asyncio.sleep(self.settings.linger_ms / 1000)
        finally:
            await self._drain_in_flight()

    async def _drain_in_flight(self, timeout: float = 5.0) -> None:
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def _ship_round(self) -> bool:
        """Read and publish what is unshipped, highest priority first, streams of one
        priority in turn (round-robin, one read of at most a batch each per turn).

        A stream is only served while every stream of higher priority has nothing
        left to read: a backlog of low-priority records never delays high-priority
        ones by more than the batches already in flight. Within a priority no stream
        waits for another's backlog: each turn gives every stream with records one
        read (a stream that was served until it had nothing left kept the others of
        its priority waiting for its whole backlog, or for ever under a steady load).
        A stream with nothing above its read cursor costs no read.
        """
        progressed = False
        now = time.monotonic()
        levels: dict[int, list[tuple[str, _StreamCursor]]] = {}
        for stream in self.buffer.stream_names():
            cursor = self._cursor(stream)
            if cursor is None:
                continue
            self._maybe_retransmit(stream, cursor, now)
            await self._expire(stream, cursor, now)
            levels.setdefault(self._policy_for(stream).priority, []).append((stream, cursor))
        higher: list[tuple[str, _StreamCursor]] = []
        for priority in sorted(levels, reverse=True):
            turn = levels[priority]
            while turn and not self._stopping:
                waiting = []
                for stream, cursor in turn:
                    if self._stopping:
                        break
                    if not await self._ship_once(stream, cursor):
                        continue
                    progressed = True
                    waiting.append((stream, cursor))
                    if self._any_unread(higher):
                        return True
                turn = waiting
            higher.extend(levels[priority])
        return progressed

    def _confirmed(self, cursor: _StreamCursor, nbytes: int) -> None:
        """``nbytes`` of ``cursor``'s batches no longer await confirmation."""
        cursor.unconfirmed_bytes -= nbytes
        self._unconfirmed_bytes -= nbytes

    def _window_full(self) -> bool:
        return self._unconfirmed_bytes >= self.settings.max_unconfirmed_bytes

    def _unread(self, stream: str, cursor: _StreamCursor) -> bool:
        """Whether ``stream`` has records above its read cursor (no query: the next seq
        is ahead of the commit, so this may say yes early, never no wrongly)."""
        state = self.buffer.stream_state(stream)
        return (state is not None and state.epoch == cursor.epoch
                and state.next_seq - 1 > cursor.read_upto)

    def _any_unread(self, streams: list[tuple[str, _StreamCursor]]) -> bool:
        return any(self._unread(stream, cursor) for stream, cursor in streams)

    async def _ship_once(self, stream: str, cursor: _StreamCursor) -> bool:
        """Read at most one batch's worth of ``stream`` above its cursor and publish it
        (a gap splits it into runs, each its own batch); False when nothing was read
        (or ``max_unconfirmed_bytes`` await the cloud's commit)."""
        if not self._unread(stream, cursor) or self._window_full():
            return False
        await self._slots.acquire()
        try:
            runs = await self.buffer.read_runs(
                stream,
                cursor.read_upto,
                max_records=self.settings.batch_max_records,
                max_bytes=self.settings.batch_max_bytes,
            )
        except BaseException:
            self._slots.release()
            raise
        if not runs:
            self._slots.release()
            return False
        # One slot covers the first run; further runs (after a gap) take their own.
        for i, run in enumerate(runs):
            if i > 0:
                await self._slots.acquire()
            cursor.in_flight[run.first_seq] = run.last_seq
            cursor.read_upto = run.last_seq
            cursor.unconfirmed_bytes += run.nbytes
            self._unconfirmed_bytes += run.nbytes
            task = asyncio.create_task(
                self._publish(run, cursor, cursor.generation),
                name=f"publish:{stream}:{run.first_seq}",
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return True

    async def _publish(self, run: StoredRun, cursor: _StreamCursor, generation: int) -> None:
        try:
            body, headers = compress_body(
                encode_batch_parts(
                    self.edge_id, run.stream, epoch=run.epoch, first_seq=run.first_seq,
                    count=run.count, parts=run.parts,
                ),
                self.settings.zstd_level if self.settings.compression == "zstd" else None,
            )
            headers["Nats-Msg-Id"] = msg_id(
                self.edge_id, run.stream, run.epoch, run.first_seq, run.last_seq,
                generation=generation, salt=self.salt,
            )
            subject = self.topology.records_subject(self.edge_id, run.stream)
            attempt = 0
            while True:
                js = self._js
                try:
                    if js is None:
                        raise ConnectionError("not connected to NATS")
                    if (limit := self._max_payload) is not None and (
                            size := message_bytes(body, headers)) > limit:
                        # Sent, nats-server would refuse it by closing the connection
                        # (every stream's link). Held instead, loudly, until a server
                        # that takes it (a reconnect brings its limit).
                        self._metrics.batches_too_large.inc()
                        raise TooLarge(
                            f"the batch is a {size}-byte message; nats-server takes at "
                            f"most {limit} (its max_payload): raise max_payload (edgesync's "
                            "own servers use 8MB) or lower max_record_bytes")
                    await js.publish(
                        subject, body, timeout=self._publish_timeout, headers=headers
                    )
                    break
                except Exception as exc:
                    attempt += 1
                    delay = backoff_s(
                        attempt, base_s=0.05, cap_s=self.settings.retry_backoff_max_s
                    )
                    self._metrics.publish_failures.inc()
                    (log.error if isinstance(exc, TooLarge) else log.warning)(
                        "batch_publish_failed",
                        stream=run.stream,
                        first_seq=run.first_seq,
                        last_seq=run.last_seq,
                        attempt=attempt,
                        retry_in_s=round(delay, 3),
                        error=f"{type(exc).__name__}: {exc}",
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._link_changed.wait(), timeout=delay)
            self._metrics.batches_shipped.inc()
            self._metrics.records_shipped.labels(run.stream).inc(run.count)
            self._metrics.bytes_shipped.inc(len(body))
            del cursor.in_flight[run.first_seq]
            if run.last_seq <= cursor.cloud_upto:  # the cloud has it: no wait, no room
                self._confirmed(cursor, run.nbytes)
            else:
                cursor.uncommitted.append((run.last_seq, time.monotonic(), run.nbytes))
            cursor.shipped_high = max(cursor.shipped_high, cursor.shipped_upto())
            self.buffer.mark_shipped(run.stream, cursor.shipped_upto())
        finally:
            self._slots.release()
            # Freed slot or new watermark: the main loop may have work again.
            self.buffer.appended.set()
