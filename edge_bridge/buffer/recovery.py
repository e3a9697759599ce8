"""Opening a buffer file that may be damaged: check, quarantine, salvage.

A bridge that cannot read its buffer must not crash-loop. At open the file
gets SQLite's ``quick_check``; a damaged one (or one SQLite refuses as
corrupt or not a database) is moved aside into ``quarantine/<UTC time>/``
beside it (kept for forensics, counted and logged) and a fresh buffer starts.

From the quarantined copy (opened read-only) we salvage what is intact: the
``streams`` rows (each stream's epoch and next seq, so identities survive) and
every ``chunks`` row whose pages are intact and whose records still decode.
Rows behind a damaged page are skipped by probing rowids one at a time; what
cannot be read is counted, so the loss is a number, not a guess. Salvaged
records keep their identities; ``next_seq`` never moves back, so a seq once
handed out is never reused. Streams not salvaged get new epochs when next seen.

Only damage is quarantined: locked, unwritable or full disks are not the
file's fault and fail start-up, leaving the buffer alone.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec
import structlog

from broker.protocol.wire import Record, array_header
from edge_bridge.buffer.schema import (
    CHUNK_COLUMNS,
    STREAM_COLUMNS,
    ChunkRow,
    StreamRow,
    create_tables,
    insert_chunks,
    insert_streams,
)
from edge_bridge.buffer.streams import StreamTable

__all__ = ["FILE_SUFFIXES", "Recovery", "Salvage", "open_checked", "salvage"]

log = structlog.get_logger(__name__)

FILE_SUFFIXES: Final = ("", "-wal", "-shm")
"""The files of one SQLite database in WAL mode: main, write-ahead log, shared memory."""
_DAMAGED: Final = frozenset({11, 26})
"""SQLite error codes that mean a damaged file: SQLITE_CORRUPT, SQLITE_NOTADB."""
_MAX_MISSES: Final = 10_000
"""Consecutive unreadable rowids after which the scan of a table gives up."""
_records = msgspec.msgpack.Decoder(list[Record])


@dataclass(slots=True)
class Salvage:
    """What could be read out of a damaged buffer file."""

    streams: list[StreamRow] = field(default_factory=list)
    chunks: list[ChunkRow] = field(default_factory=list)
    """Chunks whose records decode."""
    lost_records: int = 0
    """Records in chunks that were found but could not be used."""
    unreadable_rows: int = 0
    """Rows (of any table) that could not be read at all: their records are uncounted."""


@dataclass(slots=True)
class Recovery:
    """What opening this buffer had to repair (counters for metrics and tests)."""

    quarantined: int = 0
    """Damaged buffer files moved aside at open."""
    salvaged_records: int = 0
    """Records read back out of a quarantined file (identities unchanged)."""
    lost_records: int = 0
    """Records of a quarantined file found but unusable (counted, reported)."""


def _rows(conn: sqlite3.Connection, table: str, columns: str) -> tuple[list[tuple[Any, ...]], int]:
    """Every readable row of ``table`` by rowid; returns the rows and the unreadable count."""
    try:
        return conn.execute(f"SELECT {columns} FROM {table} ORDER BY rowid").fetchall(), 0
    except sqlite3.DatabaseError:
        pass
    rows: list[tuple[Any, ...]] = []
    unreadable = misses = 0
    rowid = 0
    try:
        top = conn.execute(f"SELECT max(rowid) FROM {table}").fetchone()[0]
    except sqlite3.DatabaseError:
        top = None
    while misses < _MAX_MISSES and (top is None or rowid < top):
        rowid += 1
        try:
            row = conn.execute(
                f"SELECT {columns} FROM {table} WHERE rowid=?", (rowid,)
            ).fetchone()
        except sqlite3.DatabaseError:
            unreadable += 1
            misses += 1
            continue
        if row is None:
            misses += 1
            continue
        misses = 0
        rows.append(row)
    return rows, unreadable


def salvage(path: Path) -> Salvage:
    """Read what is intact in the damaged buffer at ``path`` (opened read-only)."""
    out = Salvage()
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return out
    with contextlib.closing(conn):
        try:
            streams, bad = _rows(conn, "streams", STREAM_COLUMNS)
            out.streams = [StreamRow(*row) for row in streams]
            out.unreadable_rows += bad
            chunks, bad = _rows(conn, "chunks", CHUNK_COLUMNS)
            out.unreadable_rows += bad
        except sqlite3.Error:
            return out  # not even the schema is readable
    known = {s.sid for s in out.streams}
    for chunk in map(ChunkRow._make, chunks):
        count = chunk.last_seq - chunk.first_seq + 1
        try:
            ok = (
                chunk.sid in known and count > 0 and isinstance(chunk.body, bytes)
                and len(_records.decode(array_header(count) + chunk.body)) == count
            )
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError):
            ok = False
        if ok:
            out.chunks.append(chunk)
        else:
            out.lost_records += max(count, 0)
    return out


def open_checked(
    path: Path,
    connect: Callable[[], sqlite3.Connection],
    streams: StreamTable,
    recovery: Recovery,
) -> sqlite3.Connection:
    """Connect to the buffer at ``path`` and load ``streams``; a damaged file is
    quarantined and salvaged (counted in ``recovery``), not fatal.

    Raises:
        sqlite3.DatabaseError: a failure that is not damage (locked, unwritable).
    """
    problem: str | None = None
    conn: sqlite3.Connection | None = None
    try:
        conn = connect()
        check = conn.execute("PRAGMA quick_check").fetchall()
        if check != [("ok",)]:
            problem = "; ".join(str(r[0]) for r in check[:5])
        else:
            create_tables(conn)
            streams.load(conn)
            return conn
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorcode", None) not in _DAMAGED:
            if conn is not None:
                conn.close()
            raise
        problem = f"{type(exc).__name__}: {exc}"
    if conn is not None:
        with contextlib.suppress(sqlite3.Error):
            conn.close()
    damaged = _quarantine(path, problem or "unreadable")
    recovery.quarantined += 1
    streams.clear()
    conn = connect()
    create_tables(conn)
    _restore_salvage(conn, salvage(damaged), recovery)
    streams.load(conn)
    return conn


def _restore_salvage(conn: sqlite3.Connection, found: Salvage, recovery: Recovery) -> None:
    """Write what was salvaged into the fresh buffer, identities unchanged."""
    next_seq = {s.sid: 0 for s in found.streams}
    for chunk in found.chunks:
        next_seq[chunk.sid] = max(next_seq[chunk.sid], chunk.last_seq + 1)
    conn.execute("BEGIN IMMEDIATE")
    # next_seq never moves back: a seq once handed out is never reused.
    insert_streams(conn, [s._replace(next_seq=max(s.next_seq, next_seq[s.sid]))
                          for s in found.streams])
    insert_chunks(conn, found.chunks)
    conn.execute("COMMIT")
    recovery.salvaged_records = sum(c.last_seq - c.first_seq + 1 for c in found.chunks)
    recovery.lost_records = found.lost_records
    log.error(
        "buffer_salvaged", streams=len(found.streams), records_kept=recovery.salvaged_records,
        records_lost=found.lost_records, unreadable_rows=found.unreadable_rows,
    )


def _quarantine(path: Path, problem: str) -> Path:
    """Move the buffer's files aside into ``quarantine/<UTC time>/``; returns where
    the main file went."""
    target = path.parent / "quarantine" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target.mkdir(parents=True, exist_ok=True)
    moved = []
    for suffix in FILE_SUFFIXES:
        source = Path(f"{path}{suffix}")
        if source.exists():
            source.rename(target / source.name)
            moved.append(source.name)
    log.error("buffer_quarantined", path=str(path), problem=problem,
              quarantine_dir=str(target), files=moved)
    return target / path.name
