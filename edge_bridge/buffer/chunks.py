"""The chunk codec: how a request's records are stored as one row and read back.

A *chunk* is a contiguous seq run of one stream, its records MessagePack-encoded
back to back exactly as they travel on the wire, so an append is one row per
chunk and the shipper splices batches from chunks without decoding a record.

Invariants: a chunk holds at most :data:`CHUNK_MAX_RECORDS` records and about
:data:`CHUNK_MAX_BYTES` encoded bytes (one larger record travels alone), so any
chunk fits in one batch; and every record is charged its encoded length plus
:data:`STORED_RECORD_OVERHEAD_BYTES` against the buffer's byte cap, the same sum
wherever it is computed (append, trim, overflow, TTL, reads).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NamedTuple

import msgspec

from broker.protocol.wire import Record, array_header

__all__ = [
    "CHUNK_MAX_BYTES",
    "CHUNK_MAX_RECORDS",
    "STORED_RECORD_OVERHEAD_BYTES",
    "EncodedChunk",
    "encode_chunks",
    "parts_size",
    "record_size",
    "split_chunk",
]

STORED_RECORD_OVERHEAD_BYTES: Final = 16
"""Bytes the buffer charges per stored record beyond its encoded form (its share of
row and index). Not the SDK's batch-sizing estimate (``WIRE_RECORD_OVERHEAD_BYTES``),
which measures something else and merely shares the value today."""
CHUNK_MAX_RECORDS: Final = 1000
CHUNK_MAX_BYTES: Final = 256 * 1024
"""A request is stored as chunks of at most this many records / encoded bytes, so
any chunk fits in one batch under NATS' default 1 MiB message limit."""

_record_encoder = msgspec.msgpack.Encoder()
_raw_list = msgspec.msgpack.Decoder(list[msgspec.Raw])


class EncodedChunk(NamedTuple):
    """One chunk of an append, ready for its row."""

    records: int
    """How many records the chunk holds."""
    body: bytes
    """The records' MessagePack arrays, back to back."""
    size: int
    """Bytes the chunk is charged against the buffer's byte cap."""


def encode_chunks(records: Sequence[Record]) -> list[EncodedChunk]:
    """Split and encode records into chunks (see :class:`EncodedChunk`).

    A run of up to :data:`CHUNK_MAX_RECORDS` records is encoded as one array in a
    single call and its header cut off: the same bytes as encoding each record,
    without a Python step per record (a profile of the bridge's append showed
    those steps). A run whose records exceed :data:`CHUNK_MAX_BYTES` together is
    split record by record, as before.
    """
    chunks: list[EncodedChunk] = []
    for start in range(0, len(records), CHUNK_MAX_RECORDS):
        run = records[start:start + CHUNK_MAX_RECORDS]
        encoded = _record_encoder.encode(run)
        body = encoded[len(array_header(len(run))):]
        if len(body) > CHUNK_MAX_BYTES:
            chunks.extend(_encode_one_by_one(run))
        else:
            chunks.append(EncodedChunk(len(run), body,
                                       len(body) + STORED_RECORD_OVERHEAD_BYTES * len(run)))
    return chunks


def _encode_one_by_one(records: Sequence[Record]
                       ) -> list[EncodedChunk]:
    """Split and encode records into chunks, measuring each record."""
    chunks: list[EncodedChunk] = []
    parts: list[bytes] = []
    nbytes = 0
    for rec in records:
        raw = _record_encoder.encode(rec)
        if parts and (len(parts) >= CHUNK_MAX_RECORDS or nbytes + len(raw) > CHUNK_MAX_BYTES):
            chunks.append(EncodedChunk(len(parts), b"".join(parts), nbytes))
            parts, nbytes = [], 0
        parts.append(raw)
        nbytes += len(raw) + STORED_RECORD_OVERHEAD_BYTES
    chunks.append(EncodedChunk(len(parts), b"".join(parts), nbytes))
    return chunks


def split_chunk(body: bytes, count: int) -> list[bytes]:
    """The encoded records of a chunk, one ``bytes`` each."""
    return [bytes(raw) for raw in _raw_list.decode(array_header(count) + body)]


def parts_size(parts: list[bytes]) -> int:
    """Bytes charged against the cap for these encoded records."""
    return sum(len(p) for p in parts) + STORED_RECORD_OVERHEAD_BYTES * len(parts)


def record_size(record: Record) -> int:
    """Bytes one record is charged against the buffer cap."""
    return len(_record_encoder.encode(record)) + STORED_RECORD_OVERHEAD_BYTES
