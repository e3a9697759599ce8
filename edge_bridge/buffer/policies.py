"""The buffer's per-stream policies that delete records before the cloud has them:
overflow (``drop_oldest`` at the byte cap, or ``block``) and TTL expiry.

Every record dropped here is counted in its stream's row and written to the
``drops`` table as a run ``(epoch, first_seq..last_seq, count, reason)`` in the
same transaction as the deletion, so the drop is reported to the cloud (and
the seqs accounted for) whatever crashes next: never silent. A drop that
continues the stream's latest run (same reason, next seq) extends that run, so
the table holds about one row per gap, however long an outage keeps dropping.

These are writer-thread operations: each runs inside the transaction of
:class:`~edge_bridge.buffer.writer.GroupWriter` and keeps the
:class:`~edge_bridge.buffer.streams.StreamTable` equal to the file.
"""

from __future__ import annotations

import sqlite3
import time

import structlog

from broker.errors import BufferFull
from broker.settings import StreamPolicy
from edge_bridge.buffer.chunks import STORED_RECORD_OVERHEAD_BYTES, parts_size, split_chunk
from edge_bridge.buffer.schema import pages, replace_chunk
from edge_bridge.buffer.streams import StreamState, StreamTable

__all__ = ["expire", "make_room"]

log = structlog.get_logger(__name__)


def make_room(
    conn: sqlite3.Connection,
    streams: StreamTable,
    state: StreamState,
    policy: StreamPolicy,
    *,
    need: int,
    max_bytes: int,
) -> None:
    """Free enough of ``state``'s oldest records for ``need`` more bytes under ``max_bytes``.

    Raises:
        BufferFull: the stream's policy is ``block``, or the stream alone does not
            hold enough to free.
    """
    excess = streams.total_bytes + need - max_bytes
    if policy.overflow == "block" or state.bytes < excess:
        raise BufferFull(
            f"buffer holds {streams.total_bytes} of {max_bytes} bytes; "
            f"stream {state.name!r} policy is {policy.overflow}",
            retry_after=1.0,
        )
    first_seq = -1
    freed = count = 0
    last_seq = 0
    for first, last, size, body in pages(
        conn,
        "SELECT first_seq, last_seq, size, body FROM chunks WHERE sid=? "
        "ORDER BY first_seq LIMIT 16",
        (state.sid,),
    ):
        if first_seq < 0:
            first_seq = first
        if freed + size <= excess or freed + size - excess < STORED_RECORD_OVERHEAD_BYTES:
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
                part_bytes += len(parts[k]) + STORED_RECORD_OVERHEAD_BYTES
                k += 1
            if k < len(parts):
                replace_chunk(conn, state.sid, first, first + k, parts[k:])
            else:
                # Every record had to go after all (the whole-chunk test above allows
                # for less than a record's charge): an empty rest would take the
                # next chunk's first seq, which the unique index refuses.
                conn.execute("DELETE FROM chunks WHERE sid=? AND first_seq=?", (state.sid, first))
            freed += part_bytes
            count += k
            last_seq = first + k - 1
        if freed >= excess:
            break
    _record_drop(
        conn, state, first_seq=first_seq, last_seq=last_seq, count=count, reason="overflow"
    )
    state.records -= count
    state.bytes -= freed
    streams.total_bytes -= freed


def expire(
    conn: sqlite3.Connection,
    streams: StreamTable,
    state: StreamState,
    *,
    after_seq: int,
    cutoff_us: int,
) -> int:
    """Drop (reason ``ttl``) the records of ``state`` above ``after_seq`` received
    before ``cutoff_us``; returns how many."""
    # Receive times grow with seq, so the expired records are a prefix: walk it
    # in seq order and stop at the first fresh one (cost ~ what expires).
    first_seq = last_seq = -1
    count = nbytes = 0
    # Whole chunks only (a chunk's records share one receive time); one that
    # straddles the cursor keeps its shipped part.
    for row_first, c_last, received, row_size, body in pages(
        conn,
        "SELECT first_seq, last_seq, received, size, body FROM chunks "
        "WHERE sid=? AND last_seq>? ORDER BY first_seq LIMIT 16",
        (state.sid, after_seq),
    ):
        if received >= cutoff_us:
            break
        c_first, size = row_first, row_size
        if c_first <= after_seq:
            parts = split_chunk(body, c_last - c_first + 1)
            kept = parts[:after_seq - c_first + 1]
            kept_bytes = parts_size(kept)
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
    _record_drop(conn, state, first_seq=first_seq, last_seq=last_seq, count=count,
                 reason="ttl")
    state.records -= count
    state.bytes -= nbytes
    streams.total_bytes -= nbytes
    return count


def _record_drop(
    conn: sqlite3.Connection,
    state: StreamState,
    *,
    first_seq: int,
    last_seq: int,
    count: int,
    reason: str,
) -> None:
    # A drop that continues the stream's previous run for the same reason extends it
    # (same first seq) instead of adding a row: under a long outage drop_oldest drops at
    # every append, and one row per drop grew this table, the reporter's reads and the
    # markers sent without bound. Rows stay ~ gaps, not drops.
    extended = conn.execute(
        "UPDATE drops SET last_seq=?, count=count+? "
        "WHERE sid=? AND epoch=? AND reason=? AND last_seq=?",
        (last_seq, count, state.sid, state.epoch, reason, first_seq - 1),
    ).rowcount
    if not extended:
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
