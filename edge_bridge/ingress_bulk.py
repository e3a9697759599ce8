"""The common MessagePack records request, checked in bulk and stored as the bytes it came in.

The general way through the ingress (:mod:`edge_bridge.ingress_records`) decodes every
record of a request into a :class:`~broker.protocol.wire.Record`, checks each one in a
Python loop (:func:`~broker.protocol.validation.record_problems`) and encodes them all
again into the buffer's chunks. A profile of the bridge under the edge-path load showed
those three steps, and the garbage collections their allocations trigger, as the
largest part of its CPU per record. Yet what the SDK sends already has the chunk's
layout: a chunk *is* the records' MessagePack arrays back to back, as on the wire.

So the common request is taken here first: the envelope decoded with its ``records``
left as raw bytes, the records then decoded strictly as
:class:`~broker.protocol.wire.PlainRecord` (all five elements, an integer ``ts``
inside the storable range, ``ct`` 0 or 1, a key of at most ``MAX_KEY_CHARS`` characters
or nil, no headers), so msgspec checks in C what the loop checked per record, into
structs the collector does not track; then the checks left over are made over all
records at once (a NUL in any key; every JSON payload with
:func:`~broker.protocol.validation.json_all_plainly_valid`). A request that passes is
stored as its own record bytes: they decode, wherever they are read again, to exactly
the values checked here (any MessagePack form of those five values is the wire format;
the SDK's is msgspec's).

Anything else (a record with headers or fewer elements, any refusal, any doubt) makes
:func:`plain_request` return ``None`` and the caller takes the general way, which
decides and words every refusal: refusals are the general way's by construction.
"""

from __future__ import annotations

from typing import Final, NamedTuple

import msgspec

from broker.protocol.ingress import ProducerId, RequestSeq
from broker.protocol.validation import json_all_plainly_valid
from broker.protocol.wire import CT_JSON, PlainRecord
from edge_bridge.buffer.chunks import (
    CHUNK_MAX_BYTES,
    CHUNK_MAX_RECORDS,
    STORED_RECORD_OVERHEAD_BYTES,
    EncodedChunk,
    encode_chunks,
)

__all__ = ["PlainRequest", "plain_request"]

class _Envelope(msgspec.Struct):
    """:class:`~broker.protocol.ingress.IngressRequest` with its records left encoded."""

    producer: ProducerId
    request_seq: RequestSeq
    records: msgspec.Raw


class PlainRequest(NamedTuple):
    """A request every record of which is storable, ready for the buffer."""

    producer: str
    request_seq: int
    records: int
    chunks: list[EncodedChunk]


_envelope = msgspec.msgpack.Decoder(_Envelope)
_plain_records = msgspec.msgpack.Decoder(list[PlainRecord])
_THREE_ENTRY_MAP: Final = b"\x83"
"""The envelope's MessagePack map header when it holds just its three fields."""
_ARRAY_HEADER_BYTES: Final = {0xDC: 3, 0xDD: 5}
"""Bytes of a MessagePack array header by its first byte (a fixarray's is 1)."""


def plain_request(body: bytes, *, max_record_bytes: int) -> PlainRequest | None:
    """``body`` (a MessagePack ingress request) checked and cut into chunks, or None when
    it is not plainly storable: then the general way must decide (see the module)."""
    if body[:1] != _THREE_ENTRY_MAP:
        return None  # other keys, or one twice: the general way reads the map as it will
    try:
        envelope = _envelope.decode(body)
        raw = envelope.records
        records = _plain_records.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    if not records or (len(body) > max_record_bytes  # else no payload can be longer
                       and max(len(r.payload) for r in records) > max_record_bytes):
        return None
    keys = [r.key for r in records if r.key is not None]
    if keys and "\x00" in "".join(keys):
        return None
    if not json_all_plainly_valid([r.payload for r in records if r.ct == CT_JSON]):
        return None
    encoded = memoryview(raw)
    start = _ARRAY_HEADER_BYTES.get(encoded[0], 1)
    size = encoded.nbytes - start
    if len(records) <= CHUNK_MAX_RECORDS and size <= CHUNK_MAX_BYTES:
        # The request's own bytes: its records' arrays, back to back, as a chunk holds them.
        chunks = [EncodedChunk(len(records), bytes(encoded[start:]),
                               size + STORED_RECORD_OVERHEAD_BYTES * len(records))]
    else:
        chunks = encode_chunks(records)
    return PlainRequest(envelope.producer, envelope.request_seq, len(records), chunks)
