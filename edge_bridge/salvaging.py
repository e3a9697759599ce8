"""Reading what can still be read out of a damaged buffer file.

When the buffer's SQLite file fails its integrity check, the bridge moves it
aside (quarantine) and salvages from the copy: the ``streams`` rows (each
stream's epoch and next seq, so identities survive) and every ``chunks`` row
whose pages are intact and whose records still decode. Rows behind a damaged
page are skipped by probing rowids one at a time; what cannot be read is
counted, so the loss is a number, not a guess.
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec

from broker.protocol.wire import Record, array_header

__all__ = ["Salvage", "salvage"]

_MAX_MISSES: Final = 10_000
"""Consecutive unreadable rowids after which the scan of a table gives up."""
_records = msgspec.msgpack.Decoder(list[Record])


@dataclass(slots=True)
class Salvage:
    streams: list[tuple[Any, ...]] = field(default_factory=list)
    """``(sid, name, epoch, next_seq, committed_seq, dropped_overflow, dropped_ttl)``."""
    chunks: list[tuple[Any, ...]] = field(default_factory=list)
    """``(sid, first_seq, last_seq, received, size, body)`` that decode."""
    lost_records: int = 0
    """Records in chunks that were found but could not be used."""
    unreadable_rows: int = 0
    """Rows (of any table) that could not be read at all: their records are uncounted."""


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
            out.streams, bad = _rows(
                conn, "streams",
                "sid, name, epoch, next_seq, committed_seq, dropped_overflow, dropped_ttl",
            )
            out.unreadable_rows += bad
            chunks, bad = _rows(conn, "chunks", "sid, first_seq, last_seq, received, size, body")
            out.unreadable_rows += bad
        except sqlite3.Error:
            return out  # not even the schema is readable
    known = {s[0] for s in out.streams}
    for chunk in chunks:
        sid, first, last, _received, _size, body = chunk
        count = last - first + 1
        try:
            ok = (
                sid in known and count > 0 and isinstance(body, bytes)
                and len(_records.decode(array_header(count) + body)) == count
            )
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError):
            ok = False
        if ok:
            out.chunks.append(chunk)
        else:
            out.lost_records += max(count, 0)
    return out
