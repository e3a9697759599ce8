"""Reading the buffer for the shipper: contiguous runs of stored records.

Reads run on the reader connection (WAL lets it run beside the writer), or on
rows the committed tail kept in memory (:mod:`~edge_bridge.buffer.tail`): the same
packing either way (:func:`runs_from_rows`). They never decode a record they can
take whole: a chunk that fits is passed on as its stored bytes; only a chunk cut by
the cursor or by a limit is split.

Invariant: a run never spans a gap (records dropped between two chunks), so
every :class:`StoredRun` is one valid batch.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from edge_bridge.buffer.chunks import STORED_RECORD_OVERHEAD_BYTES, split_chunk
from edge_bridge.buffer.schema import DropRun

__all__ = ["Row", "StoredRun", "any_drops", "oldest_received", "oldest_received_each",
           "pending_drops", "read_runs", "runs_from_rows"]

Row = tuple[int, int, int, bytes]
"""A stored chunk as the reads see it: ``(first_seq, last_seq, size, body)``."""


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


def read_runs(
    conn: sqlite3.Connection,
    *,
    stream: str,
    sid: int,
    epoch: int,
    after_seq: int,
    max_records: int,
    max_bytes: int,
) -> list[StoredRun]:
    """The records of stream ``sid`` above ``after_seq``, in contiguous runs: at most
    ``max_records`` and about ``max_bytes`` charged bytes in total."""
    cursor = conn.execute(
        "SELECT first_seq, last_seq, size, body FROM chunks "
        "WHERE sid=? AND last_seq>? ORDER BY first_seq",
        (sid, after_seq),
    )
    try:
        return runs_from_rows(cursor, stream=stream, epoch=epoch, after_seq=after_seq,
                              max_records=max_records, max_bytes=max_bytes)
    finally:
        cursor.close()


def runs_from_rows(
    rows: Iterable[Row],
    *,
    stream: str,
    epoch: int,
    after_seq: int,
    max_records: int,
    max_bytes: int,
    rest: Callable[[int, list[bytes]], None] | None = None,
) -> list[StoredRun]:
    """:func:`read_runs` over ``rows``: a stream's stored chunks holding seqs above
    ``after_seq``, in seq order (consumed only as far as the limits reach).

    When a limit cuts a chunk, ``rest`` (if given) is told the first seq left out and
    the encoded records from there to the chunk's end, already split: the committed
    tail keeps them so the next read does not split that chunk again."""
    runs: list[StoredRun] = []
    parts: list[bytes] = []
    first = expect = -1
    count = run_bytes = total = n_total = 0
    for row_first, row_last, row_size, body in rows:
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
                cost = len(raw) + STORED_RECORD_OVERHEAD_BYTES
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
            if cut and rest is not None:
                rest(c_first + c_count, records[skip + c_count:])
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
    return runs


def oldest_received(conn: sqlite3.Connection, sid: int, *, after_seq: int) -> float | None:
    """Receive time (Unix seconds) of stream ``sid``'s oldest record above ``after_seq``."""
    row = conn.execute(
        "SELECT received FROM chunks WHERE sid=? AND last_seq>? ORDER BY first_seq LIMIT 1",
        (sid, after_seq),
    ).fetchone()
    return None if row is None else row[0] / 1_000_000


def oldest_received_each(conn: sqlite3.Connection, after: dict[int, int]
                         ) -> dict[int, float | None]:
    """:func:`oldest_received` of every stream ``sid`` in ``after`` (sid -> after_seq),
    in one call: one trip to the reader thread for all streams, not one per stream."""
    return {sid: oldest_received(conn, sid, after_seq=seq) for sid, seq in after.items()}


def any_drops(conn: sqlite3.Connection) -> bool:
    """Whether any drop run is pending."""
    return bool(conn.execute("SELECT EXISTS (SELECT 1 FROM drops)").fetchone()[0])


def pending_drops(conn: sqlite3.Connection, names: dict[int, str]) -> list[DropRun]:
    """Drop runs not yet accounted for by the cloud, of the streams in ``names`` (by sid)."""
    rows = conn.execute(
        "SELECT sid, epoch, first_seq, last_seq, count, reason, at FROM drops "
        "ORDER BY sid, first_seq"
    ).fetchall()
    return [DropRun(names[r[0]], *r[1:]) for r in rows if r[0] in names]
