"""The durable edge buffer: where a record gets its identity and waits to be shipped.

SQLite in WAL mode, one file per bridge. One writer thread owns the write
connection and *group-commits*: every append, trim or drop queued while the
previous transaction was committing goes into the next one, so a single fsync
covers many concurrent requests. Readers (the shipper) use their own
connection, which WAL lets run beside the writer.

Storage: a request's records are kept as *chunks* (a contiguous seq run, its
records MessagePack-encoded back to back as on the wire), so an append is one
row per chunk and the shipper splices batches from chunks without decoding.
Trims, drops and reads that land inside a chunk split it.

Identity: each stream has a random ``epoch`` minted when the stream is first
seen in this buffer file and a dense ``seq`` assigned in the same transaction
as the records, so an acknowledged record keeps its identity through any crash
and a wiped buffer never reuses one.

Per-stream watermarks (all seqs of one epoch)::

    committed_seq  <=  shipped_seq  <   next_seq
    |-- deleted --|---- shipped ----|--- unshipped ---|

``shipped_seq`` needs no durability: losing it after a crash only means
shipping some records again, which the cloud absorbs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

import msgspec
import structlog

from broker.errors import BufferFull, ClosedError, InvalidInput
from broker.protocol.wire import Record, array_header
from broker.settings import StreamPolicy
from edge_bridge.salvaging import Salvage, salvage

__all__ = [
    "AppendResult",
    "Buffer",
    "BufferStats",
    "StoredRun",
    "StreamState",
    "encode_chunks",
    "record_size",
    "split_chunk",
]

log = structlog.get_logger(__name__)
T = TypeVar("T")

RECORD_OVERHEAD_BYTES: Final = 16
"""Bytes charged per record beyond its encoded form (its share of row and index)."""
CHUNK_MAX_RECORDS: Final = 1000
CHUNK_MAX_BYTES: Final = 256 * 1024
"""A request is stored as chunks of at most this many records / encoded bytes, so
any chunk fits in one batch under NATS' default 1 MiB message limit."""
DEDUP_WINDOW_S: Final = 600.0
"""How long a producer request id is remembered; SDK retries give up well before."""
_SCHEMA_VERSION: Final = 2
_MAX_GROUP: Final = 512
"""Most queued operations folded into one transaction."""
_DAMAGED: Final = frozenset({11, 26})
"""SQLite error codes that mean a damaged file: SQLITE_CORRUPT, SQLITE_NOTADB."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS streams (
    sid INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    epoch INTEGER NOT NULL,
    next_seq INTEGER NOT NULL,
    committed_seq INTEGER NOT NULL,
    dropped_overflow INTEGER NOT NULL DEFAULT 0,
    dropped_ttl INTEGER NOT NULL DEFAULT 0
);
-- Records are stored in chunks: a contiguous seq run of one stream, its records
-- MessagePack-encoded back to back exactly as they travel on the wire, so a
-- request is one row and a batch is a concatenation of rows.
CREATE TABLE IF NOT EXISTS chunks (
    sid INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    received INTEGER NOT NULL,
    size INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS chunks_by_seq ON chunks (sid, first_seq);
CREATE TABLE IF NOT EXISTS producer_requests (
    producer TEXT NOT NULL,
    request_seq INTEGER NOT NULL,
    stream TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    count INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (producer, request_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS drops (
    sid INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    count INTEGER NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (sid, epoch, first_seq)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where an append landed: records ``first_seq .. first_seq+count-1`` of ``epoch``."""

    epoch: int
    first_seq: int
    count: int
    duplicate: bool = False
    """True when this answers a retried request that was already stored."""


@dataclass(slots=True)
class StreamState:
    """In-memory mirror of one stream's row, owned by the writer thread."""

    sid: int
    name: str
    epoch: int
    next_seq: int
    committed_seq: int
    shipped_seq: int
    records: int = 0
    bytes: int = 0
    dropped_overflow: int = 0
    dropped_ttl: int = 0


@dataclass(frozen=True, slots=True)
class StoredRun:
    """A contiguous run of stored records of one stream, ready to be packed."""

    stream: str
    epoch: int
    first_seq: int
    count: int
    parts: list[bytes]
    """The records' MessagePack encodings, back to back, in seq order."""
    nbytes: int

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.count - 1


@dataclass(frozen=True, slots=True)
class BufferStats:
    records: int
    bytes: int
    max_bytes: int
    unshipped_records: int
    oldest_unshipped_age_s: float
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    """``{stream: {"overflow": n, "ttl": m}}`` since the buffer was created."""
    disk_bytes: int = 0


_record_encoder = msgspec.msgpack.Encoder()
_raw_list = msgspec.msgpack.Decoder(list[msgspec.Raw])


def encode_chunks(records: Sequence[Record]) -> list[tuple[int, bytes, int]]:
    """Split and encode records into chunks: ``(count, body, size)`` each, where
    ``body`` is the records' MessagePack arrays back to back and ``size`` what the
    chunk is charged against the byte cap."""
    chunks: list[tuple[int, bytes, int]] = []
    parts: list[bytes] = []
    nbytes = 0
    for rec in records:
        raw = _record_encoder.encode(rec)
        if parts and (len(parts) >= CHUNK_MAX_RECORDS or nbytes + len(raw) > CHUNK_MAX_BYTES):
            chunks.append((len(parts), b"".join(parts), nbytes))
            parts, nbytes = [], 0
        parts.append(raw)
        nbytes += len(raw) + RECORD_OVERHEAD_BYTES
    chunks.append((len(parts), b"".join(parts), nbytes))
    return chunks


def split_chunk(body: bytes, count: int) -> list[bytes]:
    """The encoded records of a chunk, one ``bytes`` each."""
    return [bytes(raw) for raw in _raw_list.decode(array_header(count) + body)]


def _pages(
    conn: sqlite3.Connection, query: str, args: tuple[Any, ...]
) -> Iterator[tuple[Any, ...]]:
    """Rows of a ``LIMIT``-ed query that the caller deletes or shrinks as it goes:
    re-run page after page, so memory stays at one page whatever the backlog."""
    while True:
        page = conn.execute(query, args).fetchall()
        if not page:
            return
        yield from page


def _parts_size(parts: list[bytes]) -> int:
    """Bytes charged against the cap for these encoded records."""
    return sum(len(p) for p in parts) + RECORD_OVERHEAD_BYTES * len(parts)


def record_size(record: Record) -> int:
    """Bytes one record is charged against the buffer cap."""
    return len(_record_encoder.encode(record)) + RECORD_OVERHEAD_BYTES


class _Op(Generic[T]):
    """One unit of work for the writer thread, resolved on the event loop."""

    __slots__ = ("fn", "future", "loop")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], T],
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[T],
    ) -> None:
        self.fn = fn
        self.loop = loop
        self.future = future


DISK_FULL_RETRY_AFTER_S = 5.0
"""What a producer is told to wait when the buffer's filesystem is full: space comes
back when something else frees it, or when the cloud's watermark lets us trim."""


def _disk_full_as_buffer_full(exc: Exception) -> Exception:
    """The filesystem is full (SQLITE_FULL, ENOSPC): back-pressure, not a crash. The
    transaction was rolled back, so nothing of the request is stored and the producer
    may retry it; the writer goes on and succeeds as soon as space returns."""
    full = (isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == 13
            ) or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC)
    if not full:
        return exc
    error = BufferFull(f"the buffer's disk is full: {exc}", retry_after=DISK_FULL_RETRY_AFTER_S)
    error.__cause__ = exc
    return error


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Buffer:
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
    ) -> None:
        self._dir = Path(directory)
        self._path = self._dir / "buffer.sqlite3"
        self._max_bytes = max_bytes
        self._policy_for = policy_for
        self._sync_mode = sync_mode
        self._streams: dict[str, StreamState] = {}
        self._by_sid: dict[int, StreamState] = {}
        self._total_bytes = 0
        self._ops: queue.SimpleQueue[_Op[Any] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader_pool: ThreadPoolExecutor | None = None
        self._reader: sqlite3.Connection | None = None
        self._state = "new"
        self.appended = asyncio.Event()
        """Set whenever records are appended; the shipper clears and waits on it."""
        self.space_freed = asyncio.Event()
        """Set whenever records are deleted; blocked producers may retry."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self.commits = 0
        """Transactions committed (for the group-commit metric)."""
        self.quarantined = 0
        """Damaged buffer files moved aside at open (see ``_open_checked``)."""
        self.salvaged_records = 0
        """Records read back out of a quarantined file (identities unchanged)."""
        self.lost_records = 0
        """Records of a quarantined file found but unusable (counted, reported)."""

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Buffer:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    async def open(self) -> None:
        if self._state != "new":
            raise ClosedError(f"buffer is {self._state}; a Buffer opens once")
        self._state = "opening"
        self._loop = asyncio.get_running_loop()
        self._dir.mkdir(parents=True, exist_ok=True)
        ready: asyncio.Future[None] = self._loop.create_future()
        self._writer = threading.Thread(
            target=self._writer_main, args=(ready,), name=f"buffer-writer:{self._dir}", daemon=True
        )
        self._writer.start()
        await ready
        self._reader_pool = ThreadPoolExecutor(1, thread_name_prefix="buffer-reader")
        self._reader = await self._in_reader(self._connect)
        self._state = "open"
        log.info(
            "buffer_opened",
            path=str(self._path),
            records=sum(s.records for s in self._streams.values()),
            bytes=self._total_bytes,
        )

    async def close(self) -> None:
        """Finish queued writes, then close; idempotent."""
        if self._state in ("closing", "closed", "new"):
            self._state = "closed"
            return
        self._state = "closing"
        self._ops.put(None)
        if self._writer is not None:
            await asyncio.to_thread(self._writer.join)
        if self._reader_pool is not None:
            reader = self._reader
            if reader is not None:
                await self._in_reader(reader.close)
            self._reader_pool.shutdown(wait=True)
        self._state = "closed"
        log.info("buffer_closed", path=str(self._path))

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if self._sync_mode == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA cache_size=-16000")  # 16 MiB page cache: memory stays bounded
        return conn

    async def _in_reader(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._reader_pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._reader_pool, fn, *args)

    # -- writer thread ------------------------------------------------------------

    def _writer_main(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn = self._open_checked()
        except BaseException as exc:
            loop.call_soon_threadsafe(_resolve, ready, None, exc)
            return
        loop.call_soon_threadsafe(_resolve, ready, None, None)
        stopping = False
        while not stopping:
            first = self._ops.get()
            group: list[_Op[Any]] = []
            if first is None:
                stopping = True
            else:
                group.append(first)
            while len(group) < _MAX_GROUP:
                try:
                    nxt = self._ops.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    continue
                group.append(nxt)
            if group:
                self._run_group(conn, group)
        conn.close()

    def _run_group(self, conn: sqlite3.Connection, group: list[_Op[Any]]) -> None:
        results: list[tuple[_Op[Any], Any, BaseException | None]] = []
        snapshot = self._snapshot()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in group:
                conn.execute("SAVEPOINT op")
                op_snapshot = self._snapshot()
                try:
                    result = op.fn(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    self._restore(op_snapshot)
                    results.append((op, None, _disk_full_as_buffer_full(exc)))
                else:
                    results.append((op, result, None))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
            self.commits += 1
        except Exception as exc:  # the commit itself failed (disk full, I/O error)
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            self._restore(snapshot)
            log.error("buffer_commit_failed", error=str(exc), ops=len(group))
            failure = _disk_full_as_buffer_full(exc)
            results = [(op, None, failure) for op in group]
        for op, result, error in results:
            op.loop.call_soon_threadsafe(_resolve, op.future, result, error)

    def _snapshot(self) -> tuple[int, dict[str, tuple[Any, ...]]]:
        return self._total_bytes, {
            name: (s.next_seq, s.committed_seq, s.records, s.bytes, s.dropped_overflow,
                   s.dropped_ttl)
            for name, s in self._streams.items()
        }

    def _restore(self, snap: tuple[int, dict[str, tuple[Any, ...]]]) -> None:
        self._total_bytes, streams = snap
        for name in list(self._streams):
            if name not in streams:
                state = self._streams.pop(name)
                self._by_sid.pop(state.sid, None)
                continue
            s = self._streams[name]
            (s.next_seq, s.committed_seq, s.records, s.bytes, s.dropped_overflow,
             s.dropped_ttl) = streams[name]
            s.shipped_seq = max(s.shipped_seq, s.committed_seq)

    def _open_checked(self) -> sqlite3.Connection:
        """Connect and load the buffer; a damaged file is quarantined, not fatal.

        A bridge that cannot read its buffer must not crash-loop: the files go to
        ``quarantine/<UTC time>/`` beside it (kept for forensics, counted and
        logged), and a fresh buffer starts; its streams get new epochs, so no
        identity the damaged buffer may have handed out is ever reused.
        """
        problem: str | None = None
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect()
            check = conn.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                problem = "; ".join(str(r[0]) for r in check[:5])
            else:
                self._load(conn)
                return conn
        except sqlite3.DatabaseError as exc:
            # Only damage is quarantined: locked, unwritable or full disks are not
            # the file's fault and must fail start-up, leaving the buffer alone.
            if getattr(exc, "sqlite_errorcode", None) not in _DAMAGED:
                if conn is not None:
                    conn.close()
                raise
            problem = f"{type(exc).__name__}: {exc}"
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        damaged = self._quarantine(problem or "unreadable")
        self._streams.clear()
        self._by_sid.clear()
        self._total_bytes = 0
        conn = self._connect()
        conn.executescript(_SCHEMA)
        self._restore_salvage(conn, salvage(damaged))
        self._load(conn)
        return conn

    def _restore_salvage(self, conn: sqlite3.Connection, found: Salvage) -> None:
        """Write what was salvaged into the fresh buffer, identities unchanged."""
        next_seq = {sid: 0 for sid, *_ in found.streams}
        for sid, _first, last, *_ in found.chunks:
            next_seq[sid] = max(next_seq[sid], last + 1)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO streams(sid, name, epoch, next_seq, committed_seq, dropped_overflow, "
            "dropped_ttl) VALUES (?, ?, ?, ?, ?, ?, ?)",
            # next_seq never moves back: a seq once handed out is never reused.
            [(sid, name, epoch, max(nxt, next_seq[sid]), committed, d_over, d_ttl)
             for sid, name, epoch, nxt, committed, d_over, d_ttl in found.streams],
        )
        conn.executemany(
            "INSERT INTO chunks(sid, first_seq, last_seq, received, size, body) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            found.chunks,
        )
        conn.execute("COMMIT")
        self.salvaged_records = sum(last - first + 1 for _, first, last, *_ in found.chunks)
        self.lost_records = found.lost_records
        log.error(
            "buffer_salvaged", streams=len(found.streams), records_kept=self.salvaged_records,
            records_lost=found.lost_records, unreadable_rows=found.unreadable_rows,
        )

    def _quarantine(self, problem: str) -> Path:
        """Move the buffer's files aside into ``quarantine/<UTC time>/``; returns where
        the main file went."""
        target = self._dir / "quarantine" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target.mkdir(parents=True, exist_ok=True)
        moved = []
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self._path}{suffix}")
            if source.exists():
                source.rename(target / source.name)
                moved.append(source.name)
        self.quarantined += 1
        log.error("buffer_quarantined", path=str(self._path), problem=problem,
                  quarantine_dir=str(target), files=moved)
        return target / self._path.name

    def _load(self, conn: sqlite3.Connection) -> None:
        conn.executescript(_SCHEMA)
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (_SCHEMA_VERSION,)
            )
        elif int(row[0]) != _SCHEMA_VERSION:
            raise InvalidInput(f"buffer schema version {row[0]} is not {_SCHEMA_VERSION}")
        for sid, name, epoch, next_seq, committed, d_over, d_ttl in conn.execute(
            "SELECT sid, name, epoch, next_seq, committed_seq, dropped_overflow, dropped_ttl "
            "FROM streams"
        ):
            state = StreamState(sid, name, epoch, next_seq, committed, committed,
                                dropped_overflow=d_over, dropped_ttl=d_ttl)
            self._streams[name] = state
            self._by_sid[sid] = state
        for sid, count, nbytes in conn.execute(
            "SELECT sid, sum(last_seq - first_seq + 1), coalesce(sum(size), 0) FROM chunks "
            "GROUP BY sid"
        ):
            if sid in self._by_sid:
                self._by_sid[sid].records = count
                self._by_sid[sid].bytes = nbytes
                self._total_bytes += nbytes

    def _stream(self, conn: sqlite3.Connection, name: str) -> StreamState:
        state = self._streams.get(name)
        if state is not None:
            return state
        epoch = secrets.randbits(63) or 1
        cur = conn.execute(
            "INSERT INTO streams(name, epoch, next_seq, committed_seq) VALUES (?, ?, 1, 0)",
            (name, epoch),
        )
        sid = cur.lastrowid
        assert sid is not None
        state = StreamState(sid, name, epoch, next_seq=1, committed_seq=0, shipped_seq=0)
        self._streams[name] = state
        self._by_sid[sid] = state
        log.info("stream_epoch_minted", stream=name, epoch=epoch)
        return state

    async def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._state != "open":
            raise ClosedError(f"buffer is {self._state}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._ops.put(_Op(fn, loop, future))
        # Shielded: a cancelled caller must not lose track of a write that may commit.
        return await asyncio.shield(future)

    # -- appends -----------------------------------------------------------------

    async def append(
        self,
        stream: str,
        records: Sequence[Record],
        *,
        producer: str | None = None,
        request_seq: int | None = None,
    ) -> AppendResult:
        """Store records durably and give them their identity.

        Returns once the transaction holding them has committed.

        Raises:
            BufferFull: the cap is reached and the stream's policy is ``block``
                (or nothing droppable is left).
            InvalidInput: the request alone is larger than the whole buffer.
        """
        if not records:
            raise InvalidInput("an append needs at least one record")
        now = time.time()
        received = int(now * 1_000_000)
        chunks = encode_chunks(records)
        total = sum(size for _, _, size in chunks)
        if total > self._max_bytes:
            raise InvalidInput(
                f"request of {total} bytes exceeds the whole buffer cap of {self._max_bytes}"
            )
        policy = self._policy_for(stream)

        def op(conn: sqlite3.Connection) -> AppendResult:
            if producer is not None and request_seq is not None:
                hit = conn.execute(
                    "SELECT epoch, first_seq, count FROM producer_requests "
                    "WHERE producer=? AND request_seq=?",
                    (producer, request_seq),
                ).fetchone()
                if hit is not None:
                    return AppendResult(hit[0], hit[1], hit[2], duplicate=True)
            state = self._stream(conn, stream)
            if self._total_bytes + total > self._max_bytes:
                self._make_room(conn, state, policy, total)
            first = state.next_seq
            sid = state.sid
            rows = []
            seq = first
            for count, body, size in chunks:
                rows.append((sid, seq, seq + count - 1, received, size, body))
                seq += count
            conn.executemany(
                "INSERT INTO chunks(sid, first_seq, last_seq, received, size, body) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            n = seq - first
            state.next_seq = seq
            conn.execute("UPDATE streams SET next_seq=? WHERE sid=?", (state.next_seq, sid))
            if producer is not None and request_seq is not None:
                conn.execute(
                    "INSERT INTO producer_requests VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (producer, request_seq, stream, state.epoch, first, n, now),
                )
            state.records += n
            state.bytes += total
            self._total_bytes += total
            return AppendResult(state.epoch, first, n)

        result = await self._submit(op)
        if not result.duplicate:
            self.appended.set()
        return result

    def _make_room(
        self, conn: sqlite3.Connection, state: StreamState, policy: StreamPolicy, need: int
    ) -> None:
        excess = self._total_bytes + need - self._max_bytes
        if policy.overflow == "block" or state.bytes < excess:
            raise BufferFull(
                f"buffer holds {self._total_bytes} of {self._max_bytes} bytes; "
                f"stream {state.name!r} policy is {policy.overflow}",
                retry_after=1.0,
            )
        first_seq = -1
        freed = count = 0
        last_seq = 0
        for first, last, size, body in _pages(
            conn,
            "SELECT first_seq, last_seq, size, body FROM chunks WHERE sid=? "
            "ORDER BY first_seq LIMIT 16",
            (state.sid,),
        ):
            if first_seq < 0:
                first_seq = first
            if freed + size <= excess or freed + size - excess < RECORD_OVERHEAD_BYTES:
                # The whole chunk goes.
                conn.execute("DELETE FROM chunks WHERE sid=? AND first_seq=?", (state.sid, first))
                freed += size
                count += last - first + 1
                last_seq = last
            else:
                # Only its oldest records go: keep the rest as a shorter chunk.
                parts = split_chunk(body, last - first + 1)
                k, part_bytes = 0, 0
                while freed + part_bytes < excess:
                    part_bytes += len(parts[k]) + RECORD_OVERHEAD_BYTES
                    k += 1
                self._replace_chunk(conn, state.sid, first, first + k, parts[k:])
                freed += part_bytes
                count += k
                last_seq = first + k - 1
            if freed >= excess:
                break
        self._record_drop(
            conn, state, first_seq=first_seq, last_seq=last_seq, count=count, reason="overflow"
        )
        state.records -= count
        state.bytes -= freed
        self._total_bytes -= freed

    @staticmethod
    def _replace_chunk(
        conn: sqlite3.Connection, sid: int, old_first: int, new_first: int, parts: list[bytes]
    ) -> None:
        """Replace the chunk at ``old_first`` by its tail ``parts`` starting at ``new_first``."""
        conn.execute(
            "UPDATE chunks SET first_seq=?, size=?, body=? WHERE sid=? AND first_seq=?",
            (new_first, _parts_size(parts),
             b"".join(parts), sid, old_first),
        )

    def _record_drop(
        self,
        conn: sqlite3.Connection,
        state: StreamState,
        *,
        first_seq: int,
        last_seq: int,
        count: int,
        reason: str,
    ) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO drops VALUES (?, ?, ?, ?, ?, ?, ?)",
            (state.sid, state.epoch, first_seq, last_seq, count, reason, time.time()),
        )
        if reason == "overflow":
            state.dropped_overflow += count
        else:
            state.dropped_ttl += count
        conn.execute(
            "UPDATE streams SET dropped_overflow=?, dropped_ttl=? WHERE sid=?",
            (state.dropped_overflow, state.dropped_ttl, state.sid),
        )
        log.warning(
            "records_dropped", stream=state.name, epoch=state.epoch, first_seq=first_seq,
            last_seq=last_seq, count=count, reason=reason,
        )

    # -- shipping side -------------------------------------------------------------

    def stream_names(self) -> list[str]:
        return list(self._streams)

    def stream_state(self, stream: str) -> StreamState | None:
        return self._streams.get(stream)

    async def read_runs(
        self, stream: str, after_seq: int, *, max_records: int, max_bytes: int
    ) -> list[StoredRun]:
        """Read the records of ``stream`` above ``after_seq``, in contiguous runs.

        A run breaks where records were dropped, so every run is one valid batch.
        At most ``max_records`` and about ``max_bytes`` payload bytes in total.
        """
        state = self._streams.get(stream)
        if state is None:
            return []
        sid, epoch = state.sid, state.epoch

        def read() -> list[StoredRun]:
            assert self._reader is not None
            runs: list[StoredRun] = []
            parts: list[bytes] = []
            first = expect = -1
            count = run_bytes = total = n_total = 0
            cursor = self._reader.execute(
                "SELECT first_seq, last_seq, size, body FROM chunks "
                "WHERE sid=? AND last_seq>? ORDER BY first_seq",
                (sid, after_seq),
            )
            for row_first, row_last, row_size, body in cursor:
                c_first, c_count, size = row_first, row_last - row_first + 1, row_size
                room_records = max_records - n_total
                room_bytes = max_bytes - total
                if c_first <= after_seq or c_count > room_records or size > room_bytes:
                    # Take part of the chunk: its records after the cursor, within limits.
                    records = split_chunk(body, c_count)
                    skip = max(0, after_seq - c_first + 1)
                    take: list[bytes] = []
                    take_bytes = 0
                    for raw in records[skip:]:
                        cost = len(raw) + RECORD_OVERHEAD_BYTES
                        if len(take) >= room_records or (take and take_bytes + cost > room_bytes):
                            break
                        take.append(raw)
                        take_bytes += cost
                    if not take or (parts and take_bytes > room_bytes):
                        break
                    cut = len(take) < len(records) - skip  # stopped by a limit
                    c_first, c_count, size, chunk_parts = (
                        c_first + skip, len(take), take_bytes, take
                    )
                else:
                    chunk_parts = [body]
                    cut = False
                if parts and c_first != expect:
                    runs.append(StoredRun(stream, epoch, first, count, parts, run_bytes))
                    parts, count, run_bytes = [], 0, 0
                if not parts:
                    first = c_first
                parts.extend(chunk_parts)
                count += c_count
                run_bytes += size
                total += size
                n_total += c_count
                expect = c_first + c_count
                if cut or n_total >= max_records or total >= max_bytes:
                    break
            if parts:
                runs.append(StoredRun(stream, epoch, first, count, parts, run_bytes))
            cursor.close()
            return runs

        return await self._in_reader(read)

    async def oldest_unshipped_received(self, stream: str) -> float | None:
        """Receive time (Unix seconds) of the stream's oldest unshipped record."""
        state = self._streams.get(stream)
        if state is None:
            return None
        sid, after = state.sid, state.shipped_seq

        def read() -> float | None:
            assert self._reader is not None
            row = self._reader.execute(
                "SELECT received FROM chunks WHERE sid=? AND last_seq>? ORDER BY first_seq "
                "LIMIT 1",
                (sid, after),
            ).fetchone()
            return None if row is None else row[0] / 1_000_000

        return await self._in_reader(read)

    def mark_shipped(self, stream: str, upto_seq: int) -> None:
        """Record that JetStream acknowledged everything of ``stream`` up to ``upto_seq``."""
        state = self._streams.get(stream)
        if state is not None and upto_seq > state.shipped_seq:
            state.shipped_seq = upto_seq

    async def trim(self, stream: str, epoch: int, upto_seq: int) -> int:
        """Delete records of ``stream``/``epoch`` up to ``upto_seq`` (they are safe
        elsewhere). Returns the number of records deleted."""
        state = self._streams.get(stream)
        if state is None or state.epoch != epoch or upto_seq <= state.committed_seq:
            return 0

        def op(conn: sqlite3.Connection) -> int:
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
                self._replace_chunk(conn, state.sid, c_first, upto_seq + 1, keep)
                count += upto_seq - c_first + 1
                nbytes += c_size - _parts_size(keep)
            # Drop runs the cloud has accounted for need not be reported again.
            conn.execute(
                "DELETE FROM drops WHERE sid=? AND epoch=? AND last_seq<=?",
                (state.sid, state.epoch, upto_seq),
            )
            state.committed_seq = max(state.committed_seq, upto_seq)
            state.shipped_seq = max(state.shipped_seq, upto_seq)
            conn.execute(
                "UPDATE streams SET committed_seq=? WHERE sid=?", (state.committed_seq, state.sid)
            )
            state.records -= count
            state.bytes -= nbytes
            self._total_bytes -= nbytes
            return count

        deleted = await self._submit(op)
        if deleted:
            self.space_freed.set()
        return deleted

    def rewind_shipped(self, stream: str) -> None:
        """Forget that records above the committed watermark were shipped (they will be
        shipped again: retransmission after a loss between JetStream and Postgres)."""
        state = self._streams.get(stream)
        if state is not None:
            state.shipped_seq = state.committed_seq

    async def expire(self, stream: str, *, after_seq: int, ttl_s: float) -> int:
        """Drop (and count, reason ``ttl``) the records of ``stream`` above ``after_seq``
        received more than ``ttl_s`` ago. The shipper calls this before reading, with
        its read cursor, so an expired record is never shipped. Returns the count."""
        state = self._streams.get(stream)
        if state is None:
            return 0
        cutoff = int((time.time() - ttl_s) * 1_000_000)

        def op(conn: sqlite3.Connection) -> int:
            # Receive times grow with seq, so the expired records are a prefix: walk it
            # in seq order and stop at the first fresh one (cost ~ what expires).
            first_seq = last_seq = -1
            count = nbytes = 0
            # Whole chunks only (a chunk's records share one receive time); one that
            # straddles the cursor keeps its shipped part.
            for row_first, c_last, received, row_size, body in _pages(
                conn,
                "SELECT first_seq, last_seq, received, size, body FROM chunks "
                "WHERE sid=? AND last_seq>? ORDER BY first_seq LIMIT 16",
                (state.sid, after_seq),
            ):
                if received >= cutoff:
                    break
                c_first, size = row_first, row_size
                if c_first <= after_seq:
                    parts = split_chunk(body, c_last - c_first + 1)
                    kept = parts[:after_seq - c_first + 1]
                    kept_bytes = _parts_size(kept)
                    conn.execute(
                        "UPDATE chunks SET last_seq=?, size=?, body=? WHERE sid=? AND first_seq=?",
                        (after_seq, kept_bytes, b"".join(kept), state.sid, c_first),
                    )
                    size -= kept_bytes
                    c_first = after_seq + 1
                else:
                    conn.execute(
                        "DELETE FROM chunks WHERE sid=? AND first_seq=?", (state.sid, c_first)
                    )
                if first_seq < 0:
                    first_seq = c_first
                last_seq = c_last
                count += c_last - c_first + 1
                nbytes += size
            if count == 0:
                return 0
            self._record_drop(conn, state, first_seq=first_seq, last_seq=last_seq, count=count,
                              reason="ttl")
            state.records -= count
            state.bytes -= nbytes
            self._total_bytes -= nbytes
            return count

        expired = await self._submit(op)
        if expired:
            self.space_freed.set()
        return expired

    async def pending_drops(self) -> list[tuple[str, int, int, int, int, str, float]]:
        """Drop runs the cloud has not yet accounted for:
        ``(stream, epoch, first_seq, last_seq, count, reason, dropped_at)``."""
        names = {s.sid: s.name for s in self._streams.values()}

        def read() -> list[tuple[str, int, int, int, int, str, float]]:
            assert self._reader is not None
            rows = self._reader.execute(
                "SELECT sid, epoch, first_seq, last_seq, count, reason, at FROM drops "
                "ORDER BY sid, first_seq"
            ).fetchall()
            return [(names[r[0]], *r[1:]) for r in rows if r[0] in names]

        return await self._in_reader(read)

    async def oldest_received(self, stream: str) -> float | None:
        """Receive time (Unix seconds) of the stream's oldest record not yet committed."""
        state = self._streams.get(stream)
        if state is None:
            return None
        sid = state.sid

        def read() -> float | None:
            assert self._reader is not None
            row = self._reader.execute(
                "SELECT received FROM chunks WHERE sid=? ORDER BY first_seq LIMIT 1", (sid,)
            ).fetchone()
            return None if row is None else row[0] / 1_000_000

        return await self._in_reader(read)

    async def prune_producer_requests(self, older_than_s: float = DEDUP_WINDOW_S) -> int:
        cutoff = time.time() - older_than_s

        def op(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM producer_requests WHERE at<?", (cutoff,)).rowcount

        return await self._submit(op)

    # -- reporting -------------------------------------------------------------------

    def _disk_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += os.stat(f"{self._path}{suffix}").st_size
        return total

    async def stats(self) -> BufferStats:
        oldest: float | None = None
        unshipped = 0
        for name, state in list(self._streams.items()):
            unshipped += max(0, state.next_seq - 1 - max(state.shipped_seq, state.committed_seq))
            received = await self.oldest_unshipped_received(name)
            if received is not None and (oldest is None or received < oldest):
                oldest = received
        disk = await self._in_reader(self._disk_bytes)
        return BufferStats(
            records=sum(s.records for s in self._streams.values()),
            bytes=self._total_bytes,
            max_bytes=self._max_bytes,
            unshipped_records=min(unshipped, sum(s.records for s in self._streams.values())),
            oldest_unshipped_age_s=0.0 if oldest is None else max(0.0, time.time() - oldest),
            dropped={
                s.name: {"overflow": s.dropped_overflow, "ttl": s.dropped_ttl}
                for s in self._streams.values()
            },
            disk_bytes=disk,
        )
