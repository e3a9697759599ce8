"""The committed tail: the chunks the writer just committed, kept for the shipper.

Without it the shipper reads back from SQLite, on the reader thread, the rows the
writer committed a moment before (a profile of the bridge under the edge-path load
showed that read-back, its thread hop and its ``pread`` calls beside the append).
The tail keeps those rows in memory after their transaction committed, so the
shipper's next read is served here, on the event loop, with no query.

Invariant, per stream: the tail holds exactly the rows of ``chunks`` whose
``first_seq >= cover_from`` (in seq order, as committed). Chunks never overlap, so
a read above ``after_seq`` is complete from the tail whenever
``cover_from <= after_seq + 1``; otherwise (after a restart, a retransmission that
rewinds below it, or rows evicted at the memory bound) the caller reads SQLite.

Keeping it: every change reaches the tail only after the transaction that made it
committed (:meth:`~edge_bridge.buffer.writer.GroupWriter.after_commit`), in commit
order, on the event loop; an operation rolled back changes nothing here.

- an append adds its rows (its ``first_seq`` is the stream's ``next_seq``, above
  every stored row);
- a trim up to ``seq`` forgets rows starting at or below ``seq`` (a row it cut in
  two is forgotten whole: its rest is read from SQLite);
- an overflow drop or a TTL expiry empties the stream's tail and moves
  ``cover_from`` to the stream's ``next_seq`` (they delete anywhere: rare, so the
  simple rule);
- a read forgets the rows wholly at or below its cursor (the shipper moves on;
  reading them again means a rewind, which reads SQLite); a read that a batch limit
  stopped inside a row keeps only that row's rest (:meth:`CommittedTail.cut`), so the
  tail then holds every stored *record* from ``cover_from`` on, in rows that are
  chunks or, first of all, the rest of one (what a read needs: the same records,
  the same bytes);
- past :data:`TAIL_MAX_BYTES` the oldest rows are forgotten first.

Memory is bounded by :data:`TAIL_MAX_BYTES` whatever the backlog.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final

from edge_bridge.buffer.chunks import parts_size
from edge_bridge.buffer.reads import Row

__all__ = ["TAIL_MAX_BYTES", "CommittedTail"]

TAIL_MAX_BYTES: Final = 8 * 1024 * 1024
"""Bytes of chunk bodies the tail holds at most, all streams together: a few
batches' worth (a batch is at most 1 MiB by default), which covers what is appended
while the shipper packs; a backlog beyond it (the link is down) is read from SQLite."""


@dataclass(slots=True)
class _StreamTail:
    cover_from: int
    rows: deque[Row] = field(default_factory=deque)
    nbytes: int = 0


class CommittedTail:
    """The committed rows of each stream above its ``cover_from`` (see the module)."""

    def __init__(self, max_bytes: int = TAIL_MAX_BYTES) -> None:
        self._max_bytes = max_bytes
        self._tails: dict[int, _StreamTail] = {}
        self.nbytes = 0
        """Bytes of chunk bodies held now, all streams."""
        self.hits = 0
        """Reads answered from memory."""
        self.misses = 0
        """Reads the caller had to take to SQLite."""

    def appended(self, sid: int, rows: list[Row]) -> None:
        """An append of stream ``sid`` committed ``rows`` (in seq order)."""
        tail = self._tails.get(sid)
        if tail is None:
            # Every row stored so far lies below this append's first seq.
            tail = self._tails[sid] = _StreamTail(cover_from=rows[0][0])
        for row in rows:
            tail.rows.append(row)
            tail.nbytes += len(row[3])
        self.nbytes += sum(len(row[3]) for row in rows)
        if self.nbytes > self._max_bytes:
            self._evict(tail)

    def trimmed(self, sid: int, upto_seq: int) -> None:
        """A trim of stream ``sid`` up to ``upto_seq`` committed."""
        tail = self._tails.get(sid)
        if tail is None:
            return
        rows = tail.rows
        while rows and rows[0][0] <= upto_seq:
            self._pop(tail)
        tail.cover_from = max(tail.cover_from, upto_seq + 1)

    def reset(self, sid: int, next_seq: int) -> None:
        """Records of stream ``sid`` were deleted anywhere (overflow, TTL); ``next_seq``
        is the stream's next seq at that commit."""
        tail = self._tails.get(sid)
        if tail is None:
            return
        self.nbytes -= tail.nbytes
        tail.rows.clear()
        tail.nbytes = 0
        tail.cover_from = next_seq

    def rows_after(self, sid: int, after_seq: int) -> list[Row] | None:
        """Every stored row of stream ``sid`` holding a seq above ``after_seq``, in seq
        order, or None when the tail cannot tell (read SQLite)."""
        tail = self._tails.get(sid)
        if tail is None or tail.cover_from > after_seq + 1:
            self.misses += 1
            return None
        self.hits += 1
        rows = tail.rows
        while rows and rows[0][1] <= after_seq:
            self._pop(tail)
        return list(rows)

    def cut(self, sid: int, first_seq: int, rest: list[bytes]) -> None:
        """A read of stream ``sid`` took every record below ``first_seq`` (stopped by a
        limit inside a row): keep only the records from ``first_seq`` on, the row it
        stopped in replaced by ``rest``, that row's encoded records from there."""
        tail = self._tails.get(sid)
        if tail is None or not rest:
            return
        rows = tail.rows
        while rows and rows[0][0] < first_seq:
            self._pop(tail)
        row = (first_seq, first_seq + len(rest) - 1, parts_size(rest), b"".join(rest))
        rows.appendleft(row)
        tail.nbytes += len(row[3])
        self.nbytes += len(row[3])
        tail.cover_from = first_seq

    def _pop(self, tail: _StreamTail) -> None:
        row = tail.rows.popleft()
        size = len(row[3])
        tail.nbytes -= size
        self.nbytes -= size
        tail.cover_from = row[1] + 1

    def _evict(self, first: _StreamTail) -> None:
        """Forget oldest rows until under the bound: ``first``'s, then other streams'."""
        for tail in (first, *self._tails.values()):
            while tail.rows and self.nbytes > self._max_bytes:
                self._pop(tail)
            if self.nbytes <= self._max_bytes:
                return
