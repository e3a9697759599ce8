"""The durable edge buffer: where a record gets its identity and waits to be shipped.

SQLite in WAL mode, one file per bridge. One writer thread owns the write
connection and *group-commits*: every append, trim or drop queued while the
previous transaction was committing goes into the next one, so a single fsync
covers many concurrent requests (:mod:`~edge_bridge.buffer.writer`). Readers
(the shipper) use their own connection, which WAL lets run beside the writer
(:mod:`~edge_bridge.buffer.reads`).

Storage: a request's records are kept as *chunks* (a contiguous seq run, its
records MessagePack-encoded back to back as on the wire), so an append is one
row per chunk and the shipper splices batches from chunks without decoding
(:mod:`~edge_bridge.buffer.chunks`). Trims, drops and reads that land inside a
chunk split it.

Identity: each stream has a random ``epoch`` minted when the stream is first
seen in this buffer file and a dense ``seq`` assigned in the same transaction
as the records, so an acknowledged record keeps its identity through any crash
and a wiped buffer never reuses one. The per-stream watermarks are drawn in
:mod:`~edge_bridge.buffer.streams`.

This module is the facade the bridge uses: lifecycle, appends (with producer
de-duplication), trims, and the reads and stats the shipper and heartbeats
need. Overflow and TTL live in :mod:`~edge_bridge.buffer.policies`, damage at
open in :mod:`~edge_bridge.buffer.recovery`.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import structlog

from broker.errors import ClosedError, InvalidInput, RequestConflict
from broker.opening import Opened
from broker.settings import StreamPolicy
from edge_bridge.buffer import policies, reads
from edge_bridge.buffer.chunks import EncodedChunk, parts_size, split_chunk
from edge_bridge.buffer.recovery import Recovery, open_checked
from edge_bridge.buffer.schema import ChunkRow, DropRun, connect, insert_chunks, replace_chunk
from edge_bridge.buffer.stats import BufferStats, disk_bytes
from edge_bridge.buffer.streams import StreamState, StreamTable
from edge_bridge.buffer.tail import CommittedTail
from edge_bridge.buffer.writer import GroupWriter

__all__ = ["DEDUP_WINDOW_S", "AppendResult", "Buffer"]

log = structlog.get_logger(__name__)
T = TypeVar("T")

DEDUP_WINDOW_S: Final = 600.0
"""How long a producer request id is remembered; SDK retries give up well before."""


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where an append landed: records ``first_seq .. first_seq+count-1`` of ``epoch``."""

    epoch: int
    first_seq: int
    count: int
    duplicate: bool = False
    """True when this answers a retried request that was already stored."""


class Buffer(Opened):
    """The durable, bounded, group-committing record buffer of one edge bridge.

    Use as ``async with Buffer(...) as buffer``. All methods are coroutines that
    may be called concurrently from the event loop.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        policy_for: Callable[[str], StreamPolicy],
        sync_mode: str = "full",
        max_streams: int = 2500,
    ) -> None:
        """``max_streams``: distinct stream names kept; a record for one more is refused
        (``InvalidInput``, code ``too_many_streams``)."""
        self._dir = Path(directory)
        self._path = self._dir / "buffer.sqlite3"
        self._max_bytes = max_bytes
        self._policy_for = policy_for
        self._sync_mode = sync_mode
        self._streams = StreamTable(max_streams)
        self._writer = GroupWriter(self._streams, name=f"buffer-writer:{self._dir}")
        self._recovery = Recovery()
        self.tail = CommittedTail()
        """What the writer just committed, kept for the shipper's reads
        (:mod:`~edge_bridge.buffer.tail`)."""
        self._reader_pool: ThreadPoolExecutor | None = None
        self._reader: sqlite3.Connection | None = None
        self._drops_at_open = False
        self._state = "new"
        self.appended = asyncio.Event()
        """Set whenever records are appended; the shipper clears and waits on it."""
        self.space_freed = asyncio.Event()
        """Set whenever records are deleted; blocked producers may retry."""

    # -- lifecycle -------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def commits(self) -> int:
        """Transactions committed (for the group-commit metric)."""
        return self._writer.commits

    @property
    def recovery(self) -> Recovery:
        """What opening this buffer repaired: quarantined files, salvaged and lost records
        (see :mod:`~edge_bridge.buffer.recovery`)."""
        return self._recovery

    async def open(self) -> None:
        if self._state != "new":
            raise ClosedError(f"buffer is {self._state}; a Buffer opens once")
        self._state = "opening"
        self._dir.mkdir(parents=True, exist_ok=True)
        await self._writer.start(
            lambda: open_checked(self._path, self._connect, self._streams, self._recovery)
        )
        self._reader_pool = ThreadPoolExecutor(1, thread_name_prefix="buffer-reader")
        self._reader = await self._in_reader(self._connect)
        self._drops_at_open = await self._in_reader(lambda: reads.any_drops(self._reading()))
        self._state = "open"
        log.info(
            "buffer_opened",
            path=str(self._path),
            records=sum(s.records for s in self._streams.states()),
            bytes=self._streams.total_bytes,
        )

    async def close(self) -> None:
        """Finish queued writes, then close; idempotent."""
        if self._state in ("closing", "closed", "new"):
            self._state = "closed"
            return
        self._state = "closing"
        await self._writer.stop()
        if self._reader_pool is not None:
            reader = self._reader
            if reader is not None:
                await self._in_reader(reader.close)
            self._reader_pool.shutdown(wait=True)
        self._state = "closed"
        # How often the shipper's reads were answered by the committed tail: a low share
        # under steady load says its bound is too small for the shipper's lag.
        log.info("buffer_closed", path=str(self._path),
                 reads_from_memory=self.tail.hits, reads_from_file=self.tail.misses)

    def _connect(self) -> sqlite3.Connection:
        return connect(self._path, sync_mode=self._sync_mode)

    async def _in_reader(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._reader_pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._reader_pool, fn, *args)

    def _reading(self) -> sqlite3.Connection:
        assert self._reader is not None
        return self._reader

    async def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._state != "open":
            raise ClosedError(f"buffer is {self._state}")
        return await self._writer.submit(fn)

    # -- appends -----------------------------------------------------------------

    async def append(
        self,
        stream: str,
        chunks: Sequence[EncodedChunk],
        *,
        producer: str | None = None,
        request_seq: int | None = None,
    ) -> AppendResult:
        """Store one request's records durably and give them their identity.

        The records come encoded into chunks, in order
        (:func:`~edge_bridge.buffer.chunks.encode_chunks`;
        :mod:`~edge_bridge.buffer.chunks` says what a chunk holds). Returns once
        the transaction holding them has committed.

        Raises:
            BufferFull: the cap is reached and the stream's policy is ``block``
                (or nothing droppable is left).
            InvalidInput: the request holds no record, or alone is larger than the
                whole buffer; or (code ``too_many_streams``) its stream is new and the
                buffer keeps ``max_streams`` already.
        """
        count = sum(chunk.records for chunk in chunks)
        if not count:
            raise InvalidInput("an append needs at least one record")
        now = time.time()
        received = int(now * 1_000_000)
        total = sum(chunk.size for chunk in chunks)
        if total > self._max_bytes:
            raise InvalidInput(
                f"request of {total} bytes exceeds the whole buffer cap of {self._max_bytes}"
            )
        policy = self._policy_for(stream)
        streams = self._streams
        tail, after_commit = self.tail, self._writer.after_commit

        def append_in_transaction(conn: sqlite3.Connection) -> AppendResult:
            if producer is not None and request_seq is not None:
                hit = conn.execute(
                    "SELECT epoch, first_seq, count, stream FROM producer_requests "
                    "WHERE producer=? AND request_seq=?",
                    (producer, request_seq),
                ).fetchone()
                if hit is not None:
                    if (hit[3], hit[2]) != (stream, count):
                        # A retry repeats its request; this is another one reusing the id.
                        raise RequestConflict(
                            f"producer {producer!r} request_seq {request_seq} was already "
                            f"used for {hit[2]} records of stream {hit[3]!r}"
                        )
                    return AppendResult(hit[0], hit[1], hit[2], duplicate=True)
            state = streams.ensure(conn, stream)
            if streams.total_bytes + total > self._max_bytes:
                policies.make_room(conn, streams, state, policy, need=total,
                                   max_bytes=self._max_bytes)
                after_commit(functools.partial(tail.reset, state.sid, state.next_seq))
            first = state.next_seq
            rows = []
            seq = first
            for chunk in chunks:
                rows.append(ChunkRow(state.sid, seq, seq + chunk.records - 1, received,
                                     chunk.size, chunk.body))
                seq += chunk.records
            insert_chunks(conn, rows)
            after_commit(functools.partial(
                tail.appended, state.sid, [(r.first_seq, r.last_seq, r.size, r.body)
                                           for r in rows]))
            n = seq - first
            state.next_seq = seq
            conn.execute("UPDATE streams SET next_seq=? WHERE sid=?", (state.next_seq, state.sid))
            if producer is not None and request_seq is not None:
                conn.execute(
                    "INSERT INTO producer_requests VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (producer, request_seq, stream, state.epoch, first, n, now),
                )
            state.records += n
            state.bytes += total
            streams.total_bytes += total
            return AppendResult(state.epoch, first, n)

        result = await self._submit(append_in_transaction)
        if not result.duplicate:
            self.appended.set()
        return result

    async def prune_producer_requests(self, older_than_s: float = DEDUP_WINDOW_S) -> int:
        cutoff = time.time() - older_than_s

        def prune(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM producer_requests WHERE at<?", (cutoff,)).rowcount

        return await self._submit(prune)

    # -- shipping side -------------------------------------------------------------

    def stream_names(self) -> list[str]:
        return self._streams.names()

    def stream_state(self, stream: str) -> StreamState | None:
        """The live state of ``stream`` (epoch, watermarks incl. its trim floor
        ``committed_seq``, sizes); read it, do not write it."""
        return self._streams.get(stream)

    async def read_runs(
        self, stream: str, after_seq: int, *, max_records: int, max_bytes: int
    ) -> list[reads.StoredRun]:
        """Read the records of ``stream`` above ``after_seq``, in contiguous runs.

        A run breaks where records were dropped, so every run is one valid batch.
        At most ``max_records`` and about ``max_bytes`` payload bytes in total.
        """
        state = self._streams.get(stream)
        if state is None:
            return []
        sid, epoch = state.sid, state.epoch
        rows = self.tail.rows_after(sid, after_seq)
        if rows is not None:  # what was just committed: no query, no thread hop
            return reads.runs_from_rows(
                rows, stream=stream, epoch=epoch, after_seq=after_seq,
                max_records=max_records, max_bytes=max_bytes,
                rest=functools.partial(self.tail.cut, sid))
        return await self._in_reader(lambda: reads.read_runs(
            self._reading(), stream=stream, sid=sid, epoch=epoch, after_seq=after_seq,
            max_records=max_records, max_bytes=max_bytes,
        ))

    async def oldest_unshipped_received(self, stream: str) -> float | None:
        """Receive time (Unix seconds) of the stream's oldest unshipped record."""
        state = self._streams.get(stream)
        if state is None:
            return None
        sid, after = state.sid, state.shipped_seq
        return await self._in_reader(
            lambda: reads.oldest_received(self._reading(), sid, after_seq=after))

    async def oldest_received(self, stream: str) -> float | None:
        """Receive time (Unix seconds) of the stream's oldest record not yet committed."""
        state = self._streams.get(stream)
        if state is None:
            return None
        sid = state.sid
        # Seqs start at 1: every stored chunk lies above 0.
        return await self._in_reader(
            lambda: reads.oldest_received(self._reading(), sid, after_seq=0))

    async def oldest_received_each(self, *, unshipped: bool) -> dict[str, float | None]:
        """:meth:`oldest_unshipped_received` (``unshipped``) or :meth:`oldest_received`
        of every stream, read in one trip to the reader thread (per stream, a heartbeat
        of 2,000 streams took 4,000 trips, ~0.5 s of the thread the shipper reads on)."""
        states = self._streams.states()
        after = {s.sid: (s.shipped_seq if unshipped else 0) for s in states}
        names = {s.sid: s.name for s in states}
        found = await self._in_reader(reads.oldest_received_each, self._reading(), after)
        return {names[sid]: received for sid, received in found.items()}

    async def pending_drops(self) -> list[DropRun]:
        """Drop runs the cloud has not yet accounted for."""
        states = self._streams.states()
        # A drop run is written with the drop counters, which only grow: a buffer
        # that never dropped has none, and the reporter's poll costs no read (runs a
        # salvage wrote, reason damaged, count in no counter: known from the open).
        if not self._drops_at_open and not any(
                s.dropped_overflow or s.dropped_ttl for s in states):
            return []
        names = {s.sid: s.name for s in states}
        return await self._in_reader(lambda: reads.pending_drops(self._reading(), names))

    def mark_shipped(self, stream: str, upto_seq: int) -> None:
        """Record that JetStream acknowledged everything of ``stream`` up to ``upto_seq``."""
        state = self._streams.get(stream)
        if state is not None and upto_seq > state.shipped_seq:
            state.shipped_seq = upto_seq

    def rewind_shipped(self, stream: str) -> None:
        """Forget that records above the committed watermark were shipped (they will be
        shipped again: retransmission after a loss between JetStream and Postgres)."""
        state = self._streams.get(stream)
        if state is not None:
            state.shipped_seq = state.committed_seq

    async def trim(self, stream: str, epoch: int, upto_seq: int) -> int:
        """Delete records of ``stream``/``epoch`` up to ``upto_seq`` (they are safe
        elsewhere). Returns the number of records deleted."""
        state = self._streams.get(stream)
        if state is None or state.epoch != epoch or upto_seq <= state.committed_seq:
            return 0
        streams = self._streams
        tail, after_commit = self.tail, self._writer.after_commit

        def trim_in_transaction(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT coalesce(sum(last_seq - first_seq + 1), 0), coalesce(sum(size), 0) "
                "FROM chunks WHERE sid=? AND last_seq<=?",
                (state.sid, upto_seq),
            ).fetchone()
            count, nbytes = int(row[0]), int(row[1])
            conn.execute("DELETE FROM chunks WHERE sid=? AND last_seq<=?", (state.sid, upto_seq))
            straddling = conn.execute(
                "SELECT first_seq, last_seq, size, body FROM chunks "
                "WHERE sid=? AND first_seq<=? AND last_seq>?",
                (state.sid, upto_seq, upto_seq),
            ).fetchone()
            if straddling is not None:  # committed up to the middle of a chunk
                c_first, c_last, c_size, body = straddling
                parts = split_chunk(body, c_last - c_first + 1)
                keep = parts[upto_seq - c_first + 1:]
                replace_chunk(conn, state.sid, c_first, upto_seq + 1, keep)
                count += upto_seq - c_first + 1
                nbytes += c_size - parts_size(keep)
            # Drop runs the cloud has accounted for need not be reported again.
            conn.execute(
                "DELETE FROM drops WHERE sid=? AND epoch=? AND last_seq<=?",
                (state.sid, state.epoch, upto_seq),
            )
            after_commit(functools.partial(tail.trimmed, state.sid, upto_seq))
            state.committed_seq = max(state.committed_seq, upto_seq)
            state.shipped_seq = max(state.shipped_seq, upto_seq)
            conn.execute(
                "UPDATE streams SET committed_seq=? WHERE sid=?", (state.committed_seq, state.sid)
            )
            state.records -= count
            state.bytes -= nbytes
            streams.total_bytes -= nbytes
            return count

        deleted = await self._submit(trim_in_transaction)
        if deleted:
            self.space_freed.set()
        return deleted

    async def expire(self, stream: str, *, after_seq: int, ttl_s: float) -> int:
        """Drop (and count, reason ``ttl``) the records of ``stream`` above ``after_seq``
        received more than ``ttl_s`` ago. The shipper calls this before reading, with
        its read cursor, so an expired record is never shipped. Returns the count."""
        state = self._streams.get(stream)
        if state is None:
            return 0
        cutoff_us = int((time.time() - ttl_s) * 1_000_000)
        streams = self._streams
        tail, after_commit = self.tail, self._writer.after_commit

        def expire_in_transaction(conn: sqlite3.Connection) -> int:
            count = policies.expire(conn, streams, state, after_seq=after_seq,
                                    cutoff_us=cutoff_us)
            if count:
                after_commit(functools.partial(tail.reset, state.sid, state.next_seq))
            return count

        expired = await self._submit(expire_in_transaction)
        if expired:
            self.space_freed.set()
        return expired

    # -- reporting -------------------------------------------------------------------

    async def stats(self) -> BufferStats:
        unshipped = 0
        for state in self._streams.states():
            unshipped += max(0, state.next_seq - 1 - max(state.shipped_seq, state.committed_seq))
        received = [r for r in (await self.oldest_received_each(unshipped=True)).values()
                    if r is not None]
        oldest = min(received) if received else None
        disk = await self._in_reader(disk_bytes, self._path)
        states = self._streams.states()
        return BufferStats(
            records=sum(s.records for s in states),
            bytes=self._streams.total_bytes,
            max_bytes=self._max_bytes,
            unshipped_records=min(unshipped, sum(s.records for s in states)),
            oldest_unshipped_age_s=0.0 if oldest is None else max(0.0, time.time() - oldest),
            dropped={
                s.name: {"overflow": s.dropped_overflow, "ttl": s.dropped_ttl} for s in states
            },
            disk_bytes=disk,
        )
