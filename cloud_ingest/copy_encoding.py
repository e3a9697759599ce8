"""A group's ``records`` rows as PostgreSQL binary COPY data, built in one pass.

asyncpg's ``copy_records_to_table`` takes a tuple per row and encodes each value
through the connection's codecs: two of them (``timestamptz``, set by
:func:`cloud_ingest.ingesting.init_connection`) are Python functions, so a row cost a
tuple, two Python calls and eight codec dispatches. :class:`CopyRows` writes the
binary COPY format itself from the decoded records: per row one ``struct`` pack (seq
and event time) and three pieces it shares with other rows (received_at and the
``stream_keys`` id, cached per ``stream_keys`` id; the key and the absent columns,
cached per key across groups; the payload's length prefix, cached per length), then
the payload bytes as decoded. Measured in one process (16,000-row COPYs into a real
PostgreSQL): 1.7 -> 1.0 µs of the ingest's CPU per row, encoding and sending
together. The key's piece is its own (not joined to the id's): a fleet's group holds
a thousand ids of a few batches each, whose records' keys then made a new joined
piece almost per row (~6 % of the ingest's CPU in a fan-in drain, py-spy).

The values are exactly what the tuple path sends (a property test reads rows back
through both): ``seq`` int8; ``event_time`` and ``received_at`` timestamptz, whose
binary form is int8 microseconds since 2000-01-01; ``stream_key`` int4; ``key``
text (UTF-8); ``headers`` json (its binary form is the text:
``msgspec.json.encode(headers)``, absent when the record has none or an empty map);
``payload`` json, the producer's text as sent (ct 1), or ``payload_raw`` bytea (ct 0).

Every row is exactly :data:`PIECES_PER_ROW` pieces, so any run of rows COPYs alone
(:meth:`CopyRows.data`): the writer bisects a refused COPY down to its bad rows.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from itertools import count
from typing import Final

import msgspec

from broker.protocol.wire import CT_JSON, Record

__all__ = [
    "CHUNK_ROWS", "COPY_COLUMNS", "MAX_CACHED_KEYS", "MAX_CACHED_KEY_CHARS", "PG_EPOCH_US",
    "PIECES_PER_ROW", "CopyRows", "KeyPieces",
]

COPY_COLUMNS: Final = (
    "seq", "event_time", "received_at", "stream_key", "key", "headers", "payload_raw",
    "payload",
)
"""The columns of ``records`` in the order :class:`CopyRows` writes them: ``payload``
last, so a JSON row ends with its payload bytes and the absent ``payload_raw`` joins
the pieces shared by the key's rows."""
PG_EPOCH_US: Final = 946_684_800_000_000
"""Microseconds from the Unix epoch to PostgreSQL's (2000-01-01)."""
PIECES_PER_ROW: Final = 5
"""``(seq, event_time)``; ``received_at`` and ``stream_key``; key, headers and one
payload column; the other payload column's length; its bytes (or the absent column)."""
MAX_CACHED_KEYS: Final = 16_384
"""Record keys whose COPY piece a :class:`KeyPieces` keeps; past it, it starts over."""
MAX_CACHED_KEY_CHARS: Final = 64
"""Longer keys are not kept (their piece is built per row): a full cache of the longest
kept keys holds 3.9 MiB (tracemalloc, keys and pieces)."""

CHUNK_ROWS: Final = 512
"""Rows joined into one piece of COPY data (~128 KiB of the bench's 180-byte JSON)."""
_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
"""Signature, flags (no OIDs), header extension length."""
_TRAILER: Final = b"\xff\xff"
_NULL: Final = b"\xff\xff\xff\xff"
_head = struct.Struct("!hiqiq").pack
"""Field count, then seq and event_time, each with its length."""
_length = struct.Struct("!i").pack
_json = msgspec.json.Encoder()
_KEY_PIECE_EXTRA: Final = 12
"""A key piece's bytes beside the key's: its length, and the absent columns'."""


class KeyPieces(dict[str | None, bytes]):
    """Record key -> its COPY piece: the key, then absent headers and payload_raw (a
    JSON row's). Kept across groups (a writer's keys repeat), at most
    :data:`MAX_CACHED_KEYS` of them."""

    __slots__ = ("longest",)

    def __init__(self) -> None:
        super().__init__()
        self.longest = 0
        """At least the UTF-8 bytes of every key whose piece was handed out (a bound for
        :attr:`CopyRows.max_record_bytes`; never lowered, not even when the cache starts
        over in the middle of a group whose earlier rows hold longer keys)."""

    def __missing__(self, key: str | None) -> bytes:
        piece = _text(key) + _NULL + _NULL
        if key is None or len(key) <= MAX_CACHED_KEY_CHARS:
            if len(self) >= MAX_CACHED_KEYS:
                self.clear()  # keys come from the edges: a misbehaving one can invent many
            self[key] = piece
        self.longest = max(self.longest, len(piece) - _KEY_PIECE_EXTRA)
        return piece


class CopyRows:
    """Rows for ``records`` (:data:`COPY_COLUMNS`) written as binary COPY pieces.

    All rows of one instance share ``received_at`` (a group's rows do).
    """

    __slots__ = ("_keys", "_lengths", "_other", "_pieces", "_refs", "received_us")

    def __init__(self, received_us: int, keys: KeyPieces | None = None) -> None:
        self.received_us = received_us
        self._pieces: list[bytes] = []
        self._refs: dict[int, bytes] = {}
        """``stream_key`` id -> its ``(received_at, stream_key)`` piece."""
        self._keys = KeyPieces() if keys is None else keys
        """Record key -> its piece (a writer passes its own, kept across groups)."""
        self._lengths: dict[int, bytes] = {}
        """Payload length -> its length prefix (of the rows :meth:`add` writes itself)."""
        self._other = 0
        """The most bytes of a row :meth:`_add_other` wrote (payload, key, headers)."""

    def __len__(self) -> int:
        return len(self._pieces) // PIECES_PER_ROW

    @property
    def max_record_bytes(self) -> int:
        """At least the bytes of any row's payload, headers and key, as PostgreSQL
        stores them (``octet_length``): what the feed's readers bound pages by. Free
        per row: the payload lengths are the keys of the length prefixes' cache."""
        plain = max(self._lengths, default=0) + self._keys.longest if self._lengths else 0
        return max(plain, self._other)

    def add(self, ref: int, first_seq: int, records: Iterable[Record]) -> None:
        """Add a row per record, seqs ``first_seq, first_seq + 1, ...`` (none may be None)."""
        pieces = self._pieces
        add = pieces.append
        shared = self._shared(ref)
        keys = self._keys
        lengths = self._lengths
        start = len(pieces)
        for seq, rec in zip(count(first_seq), records):
            payload = rec.payload
            if rec.ct != CT_JSON or rec.headers:
                self._add_other(shared, seq, rec)
                continue
            add(_head(8, 8, seq, 8, rec.ts - PG_EPOCH_US))
            add(shared)
            add(keys[rec.key])
            size = len(payload)
            prefix = lengths.get(size)
            if prefix is None:
                prefix = lengths[size] = _length(size)
            add(prefix)
            add(payload)
        assert (len(pieces) - start) % PIECES_PER_ROW == 0

    def add_one(self, ref: int, seq: int, rec: Record) -> None:
        """Add one row (a batch some of whose records stay out)."""
        self.add(ref, seq, (rec,))

    def data(self, lo: int = 0, hi: int | None = None) -> bytes:
        """The COPY data (header to trailer) of rows ``lo`` to ``hi`` (exclusive)."""
        return b"".join(self.chunks(lo, hi))

    def chunks(self, lo: int = 0, hi: int | None = None, *,
               rows_per_chunk: int = CHUNK_ROWS) -> Iterator[bytes]:
        """:meth:`data` in chunks of ``rows_per_chunk`` rows: what is sent while the
        next is joined stays in the CPU's cache (one 4 MiB join per group, copied
        twice more on its way to the socket, showed as 10 % of the ingest in py-spy)."""
        end = len(self) if hi is None else hi
        pieces = self._pieces
        start = lo
        parts: list[bytes] = [_HEADER]
        while True:
            stop = min(end, start + rows_per_chunk)
            parts += pieces[start * PIECES_PER_ROW:stop * PIECES_PER_ROW]
            if stop == end:
                parts.append(_TRAILER)
                yield b"".join(parts)
                return
            yield b"".join(parts)
            parts = []
            start = stop

    def _shared(self, ref: int) -> bytes:
        """The ``(received_at, stream_key)`` piece of id ``ref``."""
        shared = self._refs.get(ref)
        if shared is None:
            shared = self._refs[ref] = struct.pack(
                "!iqii", 8, self.received_us - PG_EPOCH_US, 4, ref)
        return shared

    def _add_other(self, shared: bytes, seq: int, rec: Record) -> None:
        """A row with headers or an opaque payload: nothing cached but the shared part."""
        headers = _json.encode(rec.headers) if rec.headers else None
        middle = _text(rec.key) + (
            _NULL if headers is None else _length(len(headers)) + headers)
        payload = rec.payload
        self._other = max(self._other, len(middle) + len(payload))
        if rec.ct == CT_JSON:
            pieces = (middle + _NULL, _length(len(payload)), payload)
        else:
            pieces = (middle + _length(len(payload)), payload, _NULL)
        self._pieces.append(_head(8, 8, seq, 8, rec.ts - PG_EPOCH_US))
        self._pieces.append(shared)
        self._pieces.extend(pieces)


def _text(value: str | None) -> bytes:
    """A text value with its length, or the absent value."""
    if value is None:
        return _NULL
    encoded = value.encode()
    return _length(len(encoded)) + encoded
