"""The in-memory mirror of the buffer's streams: identity, watermarks and sizes.

Per-stream watermarks (all seqs of one epoch)::

    committed_seq  <=  shipped_seq  <   next_seq
    |-- deleted --|---- shipped ----|--- unshipped ---|

``committed_seq`` is the stream's *trim floor*: every seq at or below it is
deleted here (the cloud committed or accounted for it). ``shipped_seq`` needs
no durability: losing it after a crash only means shipping some records again,
which the cloud absorbs.

Ownership: the writer thread changes a :class:`StreamTable` inside its
transactions, and rolls it back with :meth:`StreamTable.restore` when one
fails, so the mirror never claims what the file does not hold. The event loop
only reads it (and moves ``shipped_seq``, which the writer never touches).
"""

from __future__ import annotations

import operator
import secrets
import sqlite3
from dataclasses import dataclass
from typing import Final

import structlog

from broker.errors import InvalidInput
from edge_bridge.buffer.schema import STREAM_COLUMNS, StreamRow

__all__ = [
    "Snapshot",
    "StreamState",
    "StreamTable",
]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class StreamState:
    """In-memory mirror of one stream's row, owned by the writer thread."""

    sid: int
    name: str
    epoch: int
    """Random id minted when this buffer file first saw the stream."""
    next_seq: int
    """The seq the next appended record gets."""
    committed_seq: int
    """Trim floor: every seq up to here is deleted from this buffer."""
    shipped_seq: int
    """JetStream acknowledged everything up to here (not durable)."""
    records: int = 0
    bytes: int = 0
    dropped_overflow: int = 0
    dropped_ttl: int = 0


_TRANSACTIONAL: Final = (
    "next_seq", "committed_seq", "records", "bytes", "dropped_overflow", "dropped_ttl")
"""The fields of a :class:`StreamState` that a failed transaction may have changed."""
_saved = operator.attrgetter(*_TRANSACTIONAL)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The stream table as it was before a transaction (see :meth:`StreamTable.restore`)."""

    total_bytes: int
    streams: dict[str, tuple[int, ...]]
    """Each stream's ``_TRANSACTIONAL`` fields, in that order."""


class StreamTable:
    """Every stream of one buffer, by name and by sid, with the buffer's byte total."""

    def __init__(self, max_streams: int = 2500) -> None:
        self.max_streams = max_streams
        """Distinct streams :meth:`ensure` adds; one more is refused."""
        self.by_name: dict[str, StreamState] = {}
        self.by_sid: dict[int, StreamState] = {}
        self.total_bytes = 0
        """Bytes charged against the cap, over all streams."""

    def get(self, name: str) -> StreamState | None:
        return self.by_name.get(name)

    def names(self) -> list[str]:
        return list(self.by_name)

    def states(self) -> list[StreamState]:
        return list(self.by_name.values())

    def clear(self) -> None:
        self.by_name.clear()
        self.by_sid.clear()
        self.total_bytes = 0

    def _add(self, state: StreamState) -> None:
        self.by_name[state.name] = state
        self.by_sid[state.sid] = state

    def load(self, conn: sqlite3.Connection) -> None:
        """Read every stream row and the size of its stored records."""
        for row in conn.execute(f"SELECT {STREAM_COLUMNS} FROM streams"):
            s = StreamRow(*row)
            self._add(StreamState(s.sid, s.name, s.epoch, s.next_seq, s.committed_seq,
                                  s.committed_seq, dropped_overflow=s.dropped_overflow,
                                  dropped_ttl=s.dropped_ttl))
        for sid, count, nbytes in conn.execute(
            "SELECT sid, sum(last_seq - first_seq + 1), coalesce(sum(size), 0) FROM chunks "
            "GROUP BY sid"
        ):
            if sid in self.by_sid:
                self.by_sid[sid].records = count
                self.by_sid[sid].bytes = nbytes
                self.total_bytes += nbytes

    def ensure(self, conn: sqlite3.Connection, name: str) -> StreamState:
        """The stream's state; a stream seen for the first time gets its row and a
        fresh random epoch (writer thread, inside a transaction).

        Raises:
            InvalidInput: ``too_many_streams``, the stream is new and the table holds
                ``max_streams`` already.
        """
        state = self.by_name.get(name)
        if state is not None:
            return state
        if len(self.by_name) >= self.max_streams:
            raise InvalidInput(
                f"this bridge keeps {len(self.by_name)} streams, its limit "
                f"(bridge.max_streams); stream {name!r} would be one more",
                code="too_many_streams")
        epoch = secrets.randbits(63) or 1
        cur = conn.execute(
            "INSERT INTO streams(name, epoch, next_seq, committed_seq) VALUES (?, ?, 1, 0)",
            (name, epoch),
        )
        sid = cur.lastrowid
        assert sid is not None
        state = StreamState(sid, name, epoch, next_seq=1, committed_seq=0, shipped_seq=0)
        self._add(state)
        log.info("stream_epoch_minted", stream=name, epoch=epoch)
        return state

    def snapshot(self) -> Snapshot:
        return Snapshot(self.total_bytes,
                        {name: _saved(s) for name, s in self.by_name.items()})

    def restore(self, snap: Snapshot) -> None:
        """Undo what a rolled-back transaction did to the table."""
        self.total_bytes = snap.total_bytes
        for name in list(self.by_name):
            if name not in snap.streams:
                state = self.by_name.pop(name)
                self.by_sid.pop(state.sid, None)
                continue
            s = self.by_name[name]
            for field, value in zip(_TRANSACTIONAL, snap.streams[name], strict=True):
                setattr(s, field, value)
            s.shipped_seq = max(s.shipped_seq, s.committed_seq)
