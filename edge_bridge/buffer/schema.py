"""The buffer file's tables and the named rows that cross modules.

One SQLite file (``buffer.sqlite3``) holds:

- ``meta``: the schema version;
- ``streams``: one row per stream: its ``epoch``, the ``next_seq`` to hand out,
  the ``committed_seq`` below which everything is deleted here, and the drop
  counters (``dropped_overflow``, ``dropped_ttl``) since the buffer was created;
- ``chunks``: the records (see :mod:`edge_bridge.buffer.chunks`), keyed by
  ``(sid, first_seq)``, with the receive time in microseconds;
- ``producer_requests``: the de-duplication table of SDK requests;
- ``drops``: the drop runs the cloud has not yet accounted for.

Invariant: ``next_seq`` never moves back, in this file or in one salvaged from
it, so a seq once handed out is never reused within an epoch.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Final, NamedTuple

from broker.errors import InvalidInput
from edge_bridge.buffer.chunks import parts_size
from edge_bridge.sqlite_files import connect_wal

__all__ = [
    "CHUNK_COLUMNS",
    "SCHEMA_VERSION",
    "STREAM_COLUMNS",
    "ChunkRow",
    "DropRun",
    "StreamRow",
    "connect",
    "create_tables",
    "insert_chunks",
    "insert_streams",
    "pages",
    "replace_chunk",
]

SCHEMA_VERSION: Final = 2

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

STREAM_COLUMNS: Final = (
    "sid, name, epoch, next_seq, committed_seq, dropped_overflow, dropped_ttl"
)
"""The columns of a :class:`StreamRow`, in order."""
CHUNK_COLUMNS: Final = "sid, first_seq, last_seq, received, size, body"
"""The columns of a :class:`ChunkRow`, in order."""


class StreamRow(NamedTuple):
    """One row of ``streams``."""

    sid: int
    name: str
    epoch: int
    next_seq: int
    committed_seq: int
    dropped_overflow: int
    dropped_ttl: int


class ChunkRow(NamedTuple):
    """One row of ``chunks``."""

    sid: int
    first_seq: int
    last_seq: int
    received: int
    """Receive time, microseconds since the Unix epoch."""
    size: int
    """Bytes charged against the cap."""
    body: bytes


class DropRun(NamedTuple):
    """A run of records the buffer dropped that the cloud has not yet accounted for."""

    stream: str
    epoch: int
    first_seq: int
    last_seq: int
    records: int
    """How many records the run dropped."""
    reason: str
    """``overflow`` or ``ttl``, or ``damaged`` (written by a salvage, see :mod:`.recovery`)."""
    dropped_at: float
    """Unix seconds."""


def connect(path: Path, *, sync_mode: str) -> sqlite3.Connection:
    """A connection to the buffer file, writer or reader alike."""
    # 16 MiB page cache: memory stays bounded whatever the backlog.
    return connect_wal(path, sync_mode=sync_mode, busy_timeout_ms=10_000, cache_kib=16_000)


def create_tables(conn: sqlite3.Connection) -> None:
    """Create what is missing and check the schema version.

    Raises:
        InvalidInput: the file was written by another schema version.
    """
    conn.executescript(_SCHEMA)
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    if row is None:
        conn.execute(
            "INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
        )
    elif int(row[0]) != SCHEMA_VERSION:
        raise InvalidInput(f"buffer schema version {row[0]} is not {SCHEMA_VERSION}")


def insert_streams(conn: sqlite3.Connection, rows: Iterable[StreamRow]) -> None:
    conn.executemany(
        f"INSERT INTO streams({STREAM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", rows
    )


def insert_chunks(conn: sqlite3.Connection, rows: Iterable[ChunkRow]) -> None:
    conn.executemany(f"INSERT INTO chunks({CHUNK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", rows)


def replace_chunk(
    conn: sqlite3.Connection, sid: int, old_first: int, new_first: int, parts: list[bytes]
) -> None:
    """Replace the chunk at ``old_first`` by its tail ``parts`` starting at ``new_first``."""
    conn.execute(
        "UPDATE chunks SET first_seq=?, size=?, body=? WHERE sid=? AND first_seq=?",
        (new_first, parts_size(parts), b"".join(parts), sid, old_first),
    )


def pages(
    conn: sqlite3.Connection, query: str, args: tuple[Any, ...]
) -> Iterator[tuple[Any, ...]]:
    """Rows of a ``LIMIT``-ed query that the caller deletes or shrinks as it goes:
    re-run page after page, so memory stays at one page whatever the backlog."""
    while True:
        page = conn.execute(query, args).fetchall()
        if not page:
            return
        yield from page
