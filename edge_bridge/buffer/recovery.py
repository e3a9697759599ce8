"""Opening a buffer file that may be damaged: check, quarantine, salvage.

A bridge that cannot read its buffer must not crash-loop. At open the file
gets SQLite's ``quick_check``; a damaged one (or one SQLite refuses as
corrupt or not a database) is salvaged, then moved aside into
``quarantine/<UTC time>/`` beside it (kept for forensics, counted and logged)
and the salvaged file takes its place.

From the damaged file (opened read-only) we salvage what is intact into
``buffer.sqlite3.salvage``: the ``streams`` rows (each stream's epoch and next
seq, so identities survive) and every ``chunks`` row whose pages are intact and
whose records still decode, streamed a page of chunks per transaction, so a
salvage holds a few MiB whatever the backlog. Rows behind a damaged page are
skipped by probing rowids one at a time; what cannot be read is counted, so
the loss is a number, not a guess. Salvaged records keep their identities;
``next_seq`` never moves back, so a seq once handed out is never reused.
Every seq handed out above a stream's trim floor that is neither salvaged nor a
salvaged drop run becomes a drop run with reason ``damaged``, reported to the
cloud like any drop, so the stream's watermark passes the loss instead of
stopping below it for good. Streams not salvaged get new epochs when next seen.
A bridge killed at any step of this (kill -9, OOM) salvages again, or takes the
finished salvage file, at its next start (:func:`open_checked`): the backlog is
never left behind in quarantine.

Only damage is quarantined: locked, unwritable or full disks are not the
file's fault and fail start-up, leaving the buffer alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
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
_COPY_ROWS: Final = 64
"""Chunks copied per salvage transaction: a chunk holds at most ~256 KiB, so a page of
them bounds what a salvage holds in memory at once, whatever the backlog."""
_DROP_COLUMNS: Final = "sid, epoch, first_seq, last_seq, count, reason, at"
_SALVAGE_SUFFIX: Final = ".salvage"
_SALVAGED_KEY: Final = "salvaged"
"""``meta`` key of a salvage file's last transaction: ``[records kept, records lost]``."""
_records = msgspec.msgpack.Decoder(list[Record])


@dataclass(slots=True)
class Salvage:
    """What could be read out of a damaged buffer file (counts: the records themselves
    went straight into the salvage file, a page at a time)."""

    streams: int = 0
    records: int = 0
    """Records in chunks that decode, copied with their identities."""
    lost_records: int = 0
    """Records handed out, not yet trimmed, and neither salvaged nor a known drop (in
    chunks that did not decode, or in rows that could not be read): each run of them
    is a drop run with reason ``damaged``."""
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
    """Records of a quarantined file that could not be salvaged (counted, reported to
    the cloud as drop runs with reason ``damaged``)."""


def _rows(conn: sqlite3.Connection, table: str, columns: str, out: Salvage
          ) -> Iterator[tuple[Any, ...]]:
    """Every readable row of ``table`` in rowid order, one at a time (a damaged file
    may hold the whole backlog: never all of it in memory). A scan that meets a
    damaged page goes on by probing the rowids after the last one read; what cannot
    be read is counted in ``out.unreadable_rows``.

    A rowid that is simply not there (a trimmed chunk) is no damage: the probe skips to
    the next rowid the table holds, where its index can still say (a busy stream's
    thousands of trimmed rowids after a stuck stream's old chunks once made the probe
    give up, and every intact chunk after them was reported lost). It gives up only
    after :data:`_MAX_MISSES` unreadable rowids in a row."""
    last = 0
    try:
        for row in conn.execute(f"SELECT rowid, {columns} FROM {table} ORDER BY rowid"):
            last = row[0]
            yield row[1:]
        return
    except sqlite3.DatabaseError:
        pass
    misses = 0
    rowid = last
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
            out.unreadable_rows += 1
            misses += 1
            continue
        if row is None:
            try:
                after = conn.execute(f"SELECT min(rowid) FROM {table} WHERE rowid > ?",
                                     (rowid,)).fetchone()[0]
            except sqlite3.DatabaseError:  # the index is damaged there too: step by one
                if top is None:
                    misses += 1
                continue
            if after is None:
                return
            rowid = after - 1
            continue
        misses = 0
        yield row


def _drop_rows(conn: sqlite3.Connection, out: Salvage) -> list[tuple[Any, ...]]:
    """The pending drop runs of a damaged file. ``drops`` is WITHOUT ROWID (no rowid to
    probe by: :func:`_rows` found none, counted 10,000 unreadable rows and kept no run,
    so runs dropped by policy were accounted again as ``damaged``): read in key order as
    far as it reads; a damaged page ends it, counted once."""
    rows: list[tuple[Any, ...]] = []
    try:
        for row in conn.execute(f"SELECT {_DROP_COLUMNS} FROM drops "
                                "ORDER BY sid, epoch, first_seq"):
            rows.append(row)
    except sqlite3.DatabaseError:
        out.unreadable_rows += 1
    return rows


def _decodes(chunk: ChunkRow, known: Container[int]) -> bool:
    count = chunk.last_seq - chunk.first_seq + 1
    try:
        return (
            chunk.sid in known and count > 0 and isinstance(chunk.body, bytes)
            and len(_records.decode(array_header(count) + chunk.body)) == count
        )
    except (msgspec.DecodeError, msgspec.ValidationError, TypeError):
        return False


def _remove(path: Path) -> None:
    for suffix in FILE_SUFFIXES:
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def salvage(damaged: Path, target: Path) -> Salvage:
    """Copy what is intact in the damaged buffer at ``damaged`` (opened read-only) into
    a new buffer file at ``target`` (replaced if present), :data:`_COPY_ROWS` chunks per
    transaction; the last one marks ``target`` complete (:func:`_salvaged_counts`)."""
    out = Salvage()
    _remove(target)
    dst = sqlite3.connect(target, isolation_level=None)  # rollback journal: one file
    with contextlib.closing(dst):
        dst.execute("PRAGMA synchronous=FULL")
        create_tables(dst)
        streams: list[StreamRow] = []
        next_seq: dict[int, int] = {}
        drops: list[tuple[Any, ...]] = []
        try:
            src = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True)
        except sqlite3.Error:
            src = None
        if src is not None:
            with contextlib.closing(src):
                streams = [StreamRow(*row) for row in _rows(src, "streams", STREAM_COLUMNS, out)]
                next_seq = {s.sid: 0 for s in streams}
                page: list[ChunkRow] = []
                for chunk in map(ChunkRow._make, _rows(src, "chunks", CHUNK_COLUMNS, out)):
                    if not _decodes(chunk, next_seq):  # its seqs are lost: _account_losses
                        continue
                    page.append(chunk)
                    next_seq[chunk.sid] = max(next_seq[chunk.sid], chunk.last_seq + 1)
                    if len(page) >= _COPY_ROWS:
                        _copy(dst, page, out)
                        page = []
                _copy(dst, page, out)
                epochs = {s.sid: s.epoch for s in streams}
                drops = [row for row in _drop_rows(src, out) if epochs.get(row[0]) == row[1]]
        dst.execute("BEGIN IMMEDIATE")
        # next_seq never moves back: a seq once handed out is never reused.
        streams = [s._replace(next_seq=max(s.next_seq, next_seq[s.sid])) for s in streams]
        insert_streams(dst, streams)
        dst.executemany(f"INSERT OR IGNORE INTO drops({_DROP_COLUMNS}) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", drops)
        out.lost_records = _account_losses(dst, streams)
        out.streams = len(streams)
        dst.execute("INSERT INTO meta(key, value) VALUES (?, ?)",
                    (_SALVAGED_KEY, json.dumps([out.records, out.lost_records])))
        dst.execute("COMMIT")
    return out


def _account_losses(dst: sqlite3.Connection, streams: list[StreamRow]) -> int:
    """Write a drop run (reason ``damaged``) for every seq of every stream that was
    handed out, is above the trim floor, and is neither a salvaged record nor a
    salvaged drop run; returns how many. The drop reporter tells the cloud, so the
    stream's committed watermark passes the loss (a hole it never passed kept every
    later record of the stream in the buffer for good, and the stream stalled once
    the buffer filled). Rows that could not be read at all are counted this way too.
    """
    lost = 0
    now = time.time()
    for s in streams:
        expect = s.committed_seq + 1
        gaps: list[tuple[int, int]] = []
        for first, last in dst.execute(
            "SELECT first_seq, last_seq FROM chunks WHERE sid=? UNION ALL "
            "SELECT first_seq, last_seq FROM drops WHERE sid=? AND epoch=? ORDER BY 1",
            (s.sid, s.sid, s.epoch),
        ):
            if first > expect:
                gaps.append((expect, first - 1))
            expect = max(expect, last + 1)
        if expect <= s.next_seq - 1:
            gaps.append((expect, s.next_seq - 1))
        dst.executemany(
            f"INSERT INTO drops({_DROP_COLUMNS}) VALUES (?, ?, ?, ?, ?, 'damaged', ?)",
            [(s.sid, s.epoch, first, last, last - first + 1, now) for first, last in gaps])
        lost += sum(last - first + 1 for first, last in gaps)
    return lost


def _copy(dst: sqlite3.Connection, page: list[ChunkRow], out: Salvage) -> None:
    if not page:
        return
    dst.execute("BEGIN IMMEDIATE")
    for chunk in page:
        # A damaged index may show a chunk twice: the first copy is kept.
        if dst.execute(f"INSERT OR IGNORE INTO chunks({CHUNK_COLUMNS}) "
                       "VALUES (?, ?, ?, ?, ?, ?)", chunk).rowcount:
            out.records += chunk.last_seq - chunk.first_seq + 1
    dst.execute("COMMIT")


def _salvaged_counts(path: Path) -> tuple[int, int] | None:
    """``(records kept, records lost)`` of a complete salvage file, None otherwise."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    with contextlib.closing(conn):
        try:
            row = conn.execute("SELECT value FROM meta WHERE key=?", (_SALVAGED_KEY,)).fetchone()
        except sqlite3.Error:
            return None
    if row is None:
        return None
    kept, lost = json.loads(row[0])
    return int(kept), int(lost)


def _salvage_path(path: Path) -> Path:
    return path.with_name(path.name + _SALVAGE_SUFFIX)


def _put_in_place(salvaged: Path, path: Path, recovery: Recovery, counts: tuple[int, int]
                  ) -> None:
    """The complete salvage file becomes the buffer (one rename: a crash leaves either)."""
    salvaged.rename(path)
    with contextlib.suppress(OSError):  # make the rename durable where the OS lets us
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    recovery.salvaged_records, recovery.lost_records = counts


def open_checked(
    path: Path,
    connect: Callable[[], sqlite3.Connection],
    streams: StreamTable,
    recovery: Recovery,
) -> sqlite3.Connection:
    """Connect to the buffer at ``path`` and load ``streams``; a damaged file is
    salvaged and quarantined (counted in ``recovery``), not fatal.

    Crash-safe in every step: the intact records are copied into ``<path>.salvage``
    (marked complete by its last transaction) while the damaged file stays where it
    is, then the damaged file is moved to quarantine and the salvage file renamed into
    its place. Killed before the move, the next open salvages again from the start;
    killed between move and rename, it finds the complete salvage file and takes it.

    Raises:
        sqlite3.DatabaseError: a failure that is not damage (locked, unwritable).
    """
    salvaged = _salvage_path(path)
    if not path.exists() and salvaged.exists():
        counts = _salvaged_counts(salvaged)
        if counts is not None:
            log.error("buffer_salvage_resumed", path=str(path))
            _put_in_place(salvaged, path, recovery, counts)
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
            _remove(salvaged)  # left by a salvage killed early: the file is whole
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
    found = salvage(path, salvaged)
    _quarantine(path, problem or "unreadable")
    recovery.quarantined += 1
    _put_in_place(salvaged, path, recovery, (found.records, found.lost_records))
    log.error(
        "buffer_salvaged", streams=found.streams, records_kept=found.records,
        records_lost=found.lost_records, unreadable_rows=found.unreadable_rows,
    )
    streams.clear()
    conn = connect()
    create_tables(conn)
    streams.load(conn)
    return conn


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
