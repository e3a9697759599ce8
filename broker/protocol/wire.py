"""Wire format v1: the record batch that travels from edge bridge to cloud ingest.

A batch is one MessagePack map; its records are MessagePack arrays so that the
per-record overhead is a few bytes. The full format is documented in
``docs/wire-format.md``; this module is its single implementation.

Decoding is total: whatever the input, :func:`decode_batch` either returns a
valid :class:`Batch` or raises :class:`~broker.errors.DecodeError` with a reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import msgspec
import zstandard

from broker.errors import DecodeError
from broker.protocol.tokens import is_valid_token

__all__ = [
    "CT_JSON",
    "CT_RAW",
    "ENCODING_HEADER",
    "MAX_DECOMPRESSED_BYTES",
    "MAX_KEY_CHARS",
    "MAX_SEQ",
    "WIRE_VERSION",
    "Batch",
    "Record",
    "array_header",
    "compress_body",
    "decode_batch",
    "encode_batch",
    "encode_batch_parts",
    "msg_id",
]

WIRE_VERSION: Final = 1
CT_RAW: Final = 0
"""Payload is opaque bytes (stored losslessly as ``bytea``)."""
CT_JSON: Final = 1
"""Payload is UTF-8 JSON text (stored as ``jsonb``)."""
ENCODING_HEADER: Final = "Es-Encoding"
"""NATS header naming the batch body's compression (``zstd``); absent means none."""
MAX_SEQ: Final = 2**63 - 1
MAX_KEY_CHARS: Final = 1024
MAX_DECOMPRESSED_BYTES: Final = 64 * 1024 * 1024
"""A compressed batch may not expand past this: a zip bomb is a decode error."""

_INT64_MIN: Final = -(2**63)


class Record(msgspec.Struct, array_like=True, frozen=True):
    """One record: ``[ts_us, ct, payload, key, headers]`` on the wire."""

    ts: int
    """Event time, microseconds since the Unix epoch (UTC), as the producer said."""
    ct: int
    """Payload content type: :data:`CT_RAW` or :data:`CT_JSON`."""
    payload: bytes
    key: str | None = None
    headers: dict[str, str] | None = None


class Batch(msgspec.Struct, frozen=True):
    """A contiguous run of one stream's records: seqs ``first_seq .. last_seq``."""

    v: int
    edge: str
    stream: str
    epoch: int
    first_seq: int
    records: list[Record]

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.records) - 1


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Batch)
_raw_decoder = msgspec.msgpack.Decoder()
_BATCH_FIELDS: Final = frozenset(Batch.__struct_fields__)
_RECORD_ARITY: Final = len(Record.__struct_fields__)


def msg_id(
    edge: str, stream: str, epoch: int, first_seq: int, last_seq: int, *, generation: int = 0
) -> str:
    """The ``Nats-Msg-Id`` of a batch: its identity range, so JetStream de-duplicates
    a retried publish of the same range within its duplicate window.

    ``generation`` counts deliberate retransmissions (the cloud never committed the
    range): those must *not* be absorbed by JetStream's duplicate window, since the
    earlier copy is what got lost.
    """
    base = f"{edge}.{stream}.{epoch}.{first_seq}-{last_seq}"
    return base if generation == 0 else f"{base}.r{generation}"


def encode_batch(batch: Batch, *, zstd_level: int | None = None) -> tuple[bytes, dict[str, str]]:
    """Encode a batch for publishing.

    Args:
        zstd_level: compress the body with zstd at this level; ``None`` sends it plain.

    Returns:
        The body and the NATS headers that must accompany it (besides ``Nats-Msg-Id``).
    """
    return compress_body(_encoder.encode(batch), zstd_level)


class _BatchHead(msgspec.Struct):
    """Batch fields in wire order; ``records`` last, so the body can be spliced."""

    v: int
    edge: str
    stream: str
    epoch: int
    first_seq: int
    records: list[Record]


def array_header(n: int) -> bytes:
    """The MessagePack header of an array of ``n`` items."""
    if n < 16:
        return bytes([0x90 | n])
    if n < 2**16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def encode_batch_parts(
    edge: str, stream: str, *, epoch: int, first_seq: int, count: int, parts: list[bytes]
) -> bytes:
    """Encode a batch whose records are already MessagePack-encoded, back to back in
    ``parts`` (as the edge buffer stores them): no record is decoded or re-encoded."""
    head = _encoder.encode(_BatchHead(WIRE_VERSION, edge, stream, epoch, first_seq, []))
    # msgspec writes fields in definition order: the body ends with the empty array.
    assert head[-1] == 0x90
    return b"".join([head[:-1], array_header(count), *parts])


def compress_body(body: bytes, zstd_level: int | None) -> tuple[bytes, dict[str, str]]:
    """Compress an encoded batch body; returns it with the header that says how."""
    if zstd_level is None:
        return body, {}
    return zstandard.ZstdCompressor(level=zstd_level).compress(body), {ENCODING_HEADER: "zstd"}


def _decompress(data: bytes, encoding: str | None) -> bytes:
    if encoding is None or encoding == "":
        return data
    if encoding != "zstd":
        raise DecodeError(f"unknown {ENCODING_HEADER} {encoding!r} (expected 'zstd' or none)")
    try:
        return zstandard.ZstdDecompressor().decompress(
            data, max_output_size=MAX_DECOMPRESSED_BYTES
        )
    except zstandard.ZstdError as exc:
        raise DecodeError(f"invalid zstd body: {exc}") from exc


def decode_batch(
    data: bytes, headers: Mapping[str, str] | None = None, *, strict: bool = False
) -> Batch:
    """Decode and validate one batch.

    Args:
        data: the message body.
        headers: the message's NATS headers (for the body encoding).
        strict: also reject unknown fields (tests decode strictly so that a
            format drift fails loudly; production ignores them for forward
            compatibility within v1).

    Raises:
        DecodeError: with the reason, for any input that is not a valid v1 batch.
    """
    try:
        body = _decompress(data, (headers or {}).get(ENCODING_HEADER))
        batch = _decoder.decode(body)
        if strict:
            _check_no_unknown_fields(body)
    except DecodeError:
        raise
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"malformed batch: {exc}") from exc
    except Exception as exc:  # decoding must be total: nothing else may escape
        raise DecodeError(f"malformed batch: {type(exc).__name__}: {exc}") from exc
    _validate(batch)
    return batch


def _check_no_unknown_fields(body: bytes) -> None:
    raw = _raw_decoder.decode(body)
    if not isinstance(raw, dict):
        raise DecodeError("malformed batch: not a map")
    unknown = set(raw) - _BATCH_FIELDS
    if unknown:
        raise DecodeError(f"unknown batch fields {sorted(map(str, unknown))}")
    for i, rec in enumerate(raw["records"]):
        if len(rec) > _RECORD_ARITY:
            raise DecodeError(f"record {i} has {len(rec)} fields, at most {_RECORD_ARITY} known")


def _validate(batch: Batch) -> None:
    if batch.v != WIRE_VERSION:
        raise DecodeError(f"unsupported wire version {batch.v} (this build reads {WIRE_VERSION})")
    if not is_valid_token(batch.edge):
        raise DecodeError(f"invalid edge id {batch.edge!r}")
    if not is_valid_token(batch.stream):
        raise DecodeError(f"invalid stream name {batch.stream!r}")
    if not 0 < batch.epoch <= MAX_SEQ:
        raise DecodeError(f"epoch {batch.epoch} out of range 1..2^63-1")
    if not batch.records:
        raise DecodeError("batch has no records")
    if batch.first_seq < 1 or batch.last_seq > MAX_SEQ:
        raise DecodeError(f"seq range {batch.first_seq}..{batch.last_seq} out of range 1..2^63-1")
    for i, rec in enumerate(batch.records):
        if not _INT64_MIN <= rec.ts <= MAX_SEQ:
            raise DecodeError(f"record {i}: timestamp {rec.ts} outside int64")
        if rec.ct not in (CT_RAW, CT_JSON):
            raise DecodeError(f"record {i}: unknown content type {rec.ct}")
        if rec.key is not None and len(rec.key) > MAX_KEY_CHARS:
            raise DecodeError(f"record {i}: key longer than {MAX_KEY_CHARS} characters")
