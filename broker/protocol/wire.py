"""Wire format v1: the record batch that travels from edge bridge to cloud ingest.

A batch is one MessagePack map; its records are MessagePack arrays so that the
per-record overhead is a few bytes. The full format is documented in
``docs/wire-format.md``; this module is its single implementation.

Decoding is total: whatever the input, :func:`decode_batch` either returns a
valid :class:`Batch` or raises :class:`~broker.errors.DecodeError` with a reason.
:func:`decode_records` is the ingest's form: it decodes the envelope, then each
record on its own, so one bad record is reported alone with its seq instead of
condemning its batch.

Decoding is bounded: a body may not expand past :data:`MAX_BATCH_BYTES` (the
zstd stream is read up to that cap and refused beyond it, never decompressed
whole) and may not hold more than :data:`MAX_BATCH_RECORDS` records (read from
the array header before any record is allocated; a body of at most
:data:`ONE_CALL_MAX_BYTES`, too small to hold that many, is first decoded whole in
one call when all its records are plain). The shipper's batch limits stay inside
both.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Final, Literal

import msgspec

from broker.errors import DecodeError
from broker.protocol.tokens import is_valid_token

if TYPE_CHECKING:
    import zstandard

__all__ = [
    "CT_JSON",
    "CT_RAW",
    "ENCODING_HEADER",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_RECORDS",
    "MAX_EPOCH",
    "MAX_KEY_CHARS",
    "MAX_SEQ",
    "MAX_TS_US",
    "MIN_TS_US",
    "ONE_CALL_MAX_BYTES",
    "WIRE_VERSION",
    "Batch",
    "DecodedBatch",
    "PlainRecord",
    "Record",
    "array_header",
    "compress_body",
    "decode_batch",
    "decode_records",
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
MAX_SEQ: Final = 2**63 - 2
"""The last seq a record may have: the cloud keeps seqs as ``int8range`` spans whose
upper bound is one past the last seq, so int8's largest value is never a seq."""
MAX_EPOCH: Final = 2**63 - 1
"""The largest epoch (int8's largest value: an epoch is never a range bound)."""
MAX_KEY_CHARS: Final = 1024
MIN_TS_US: Final = -62_135_596_800_000_000
"""0001-01-01T00:00:00Z in microseconds since the Unix epoch: the earliest event time
the cloud stores (:mod:`broker.protocol.validation`)."""
MAX_TS_US: Final = 253_402_300_799_999_999
"""9999-12-31T23:59:59.999999Z in microseconds since the Unix epoch: the latest."""
MAX_BATCH_BYTES: Final = 16 * 1024 * 1024
"""Largest batch body once decompressed: a zstd bomb is a decode error, refused
after reading this much of it."""
MAX_BATCH_RECORDS: Final = 100_000
"""Most records in one batch (the shipper's ``batch_max_records`` is capped to it)."""

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1


class Record(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One record: ``[ts_us, ct, payload, key, headers]`` on the wire.

    Not tracked by the cyclic GC (``gc=False``): a record holds only scalars, bytes,
    strings and a flat ``dict[str, str]``, so it can never be part of a cycle, and an
    ingest group or a bridge request holds thousands of them that the GC would
    otherwise rescan at every collection."""

    ts: int
    """Event time, microseconds since the Unix epoch (UTC), as the producer said."""
    ct: int
    """Payload content type: :data:`CT_RAW` or :data:`CT_JSON`."""
    payload: bytes
    key: str | None = None
    headers: dict[str, str] | None = None


_astuple = msgspec.structs.astuple


class PlainRecord(Record, array_like=True, frozen=True, forbid_unknown_fields=True,
                  gc=False):
    """A :class:`Record` in its common shape, ``[ts, ct, payload, key, nil]`` with all
    five elements (as msgspec encodes any ``Record``), whose decoding checks the
    per-field rules of :mod:`broker.protocol.validation` that need no parse: ``ts`` in
    the storable range, ``ct`` 0 or 1, the key's length, no headers.

    Records are decoded as these first where many are checked at once: by the bridge's
    ingress (:mod:`edge_bridge.ingress_bulk`), and by :func:`decode_records` for the
    ingest (:attr:`DecodedBatch.plain`), whose validation then skips those rules
    (passes over a whole part's columns once it is decoded, which cost the ingest
    ~0.4 µs per record). Anything else is decoded again as a :class:`Record` and
    checked in full.

    It equals, and hashes as, the :class:`Record` of the same fields: only the
    decoding differs."""

    ts: Annotated[int, msgspec.Meta(ge=MIN_TS_US, le=MAX_TS_US)]
    ct: Literal[0, 1]  # CT_RAW, CT_JSON (checked below)
    key: Annotated[str, msgspec.Meta(max_length=MAX_KEY_CHARS)] | None
    headers: None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Record):
            return bool(_astuple(self) == _astuple(other))
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash(Record(*_astuple(self)))


assert (CT_RAW, CT_JSON) == (0, 1), "PlainRecord.ct spells the content types out"


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




@functools.cache
def _decompressor() -> zstandard.ZstdDecompressor:
    """The shared decompressor; the window cap also bounds what a frame header can
    make it allocate. zstandard is imported on first use: a bridge with compression
    off (the default) never loads it (~1 MiB of its idle memory)."""
    import zstandard

    return zstandard.ZstdDecompressor(max_window_size=MAX_BATCH_BYTES)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Batch)
_raw_decoder = msgspec.msgpack.Decoder()
_BATCH_FIELDS: Final = frozenset(Batch.__struct_fields__)
_RECORD_ARITY: Final = len(Record.__struct_fields__)


def msg_id(
    edge: str, stream: str, epoch: int, first_seq: int, last_seq: int, *, generation: int = 0,
    salt: str = "",
) -> str:
    """The ``Nats-Msg-Id`` of a batch: its identity range, so JetStream de-duplicates
    a retried publish of the same range within its duplicate window.

    ``generation`` counts deliberate retransmissions (the cloud never committed the
    range): those must *not* be absorbed by JetStream's duplicate window, since the
    earlier copy is what got lost.

    ``salt``: a secret of the publisher (the shipper mints one per process). JetStream's
    duplicate window is the stream's, not a subject's: any edge may publish a message
    with any ``Nats-Msg-Id`` on its own subject, and an id another edge will use, known
    in advance (the epoch is no secret: stream info lists the watermark keys), made
    JetStream drop that edge's batch as a duplicate, and every retransmission of it too.
    """
    base = f"{edge}.{stream}.{epoch}.{first_seq}-{last_seq}"
    if salt:
        base = f"{base}.{salt}"
    return base if generation == 0 else f"{base}.r{generation}"


def encode_batch(batch: Batch, *, zstd_level: int | None = None) -> tuple[bytes, dict[str, str]]:
    """Encode a batch for publishing.

    Args:
        zstd_level: compress the body with zstd at this level; ``None`` sends it plain.

    Returns:
        The body and the NATS headers that must accompany it (besides ``Nats-Msg-Id``).
    """
    return compress_body(_encoder.encode(batch), zstd_level)


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
    head = _encoder.encode(Batch(WIRE_VERSION, edge, stream, epoch, first_seq, []))
    # msgspec writes fields in definition order, ``records`` last: the body ends with
    # the empty array, which the records' own array replaces.
    assert head[-1] == 0x90
    return b"".join([head[:-1], array_header(count), *parts])


def compress_body(body: bytes, zstd_level: int | None) -> tuple[bytes, dict[str, str]]:
    """Compress an encoded batch body; returns it with the header that says how."""
    if zstd_level is None:
        return body, {}
    import zstandard

    return zstandard.ZstdCompressor(level=zstd_level).compress(body), {ENCODING_HEADER: "zstd"}


def _decompress(data: bytes, encoding: str | None) -> bytes:
    if encoding is None or encoding == "":
        if len(data) > MAX_BATCH_BYTES:
            raise DecodeError(f"batch body of {len(data)} bytes exceeds {MAX_BATCH_BYTES}")
        return data
    if encoding != "zstd":
        raise DecodeError(f"unknown {ENCODING_HEADER} {encoding!r} (expected 'zstd' or none)")
    import zstandard

    try:
        # Streamed, so a frame that claims (or expands to) gigabytes is refused after
        # MAX_BATCH_BYTES + 1 bytes were produced, whatever its header says.
        reader = _decompressor().stream_reader(data, read_across_frames=True)
        parts: list[bytes] = []
        size = 0
        while size <= MAX_BATCH_BYTES:
            part = reader.read(min(1 << 20, MAX_BATCH_BYTES + 1 - size))
            if not part:
                break
            parts.append(part)
            size += len(part)
    except zstandard.ZstdError as exc:
        raise DecodeError(f"invalid zstd body: {exc}") from exc
    if size > MAX_BATCH_BYTES:
        raise DecodeError(
            f"zstd body expands past {MAX_BATCH_BYTES} bytes (from {len(data)}): refused"
        )
    return b"".join(parts)


def decode_batch(
    data: bytes, headers: Mapping[str, str] | None = None, *, strict: bool = False
) -> Batch:
    """Decode and validate one batch, all or nothing.

    Args:
        data: the message body.
        headers: the message's NATS headers (for the body encoding).
        strict: also reject unknown fields (tests decode strictly so that a
            format drift fails loudly; production ignores them for forward
            compatibility within v1).

    Raises:
        DecodeError: with the reason, for any input that is not a valid v1 batch.
    """
    decoded = decode_records(data, headers)
    if decoded.problems:
        index, reason, _ = decoded.problems[0]
        raise DecodeError(f"record {index}: {reason}", span=decoded.span)
    if strict:
        _check_no_unknown_fields(_decompress(data, (headers or {}).get(ENCODING_HEADER)))
    return Batch(WIRE_VERSION, decoded.edge, decoded.stream, decoded.epoch, decoded.first_seq,
                 [r for r in decoded.records if r is not None])


class DecodedBatch(msgspec.Struct, frozen=True):
    """A batch whose envelope is valid; each record decoded (and checked) on its own.

    ``records[i]`` is seq ``first_seq + i``, or ``None`` where that record is
    malformed; ``problems`` then holds ``(i, reason, the record's bytes)``.

    A msgspec struct, not a frozen dataclass: the ingest makes one per batch, and a
    frozen dataclass's ``__init__`` (a ``object.__setattr__`` per field) cost ~3 µs of a
    fleet's 10-record batch (measured).
    """

    edge: str
    stream: str
    epoch: int
    first_seq: int
    records: list[Record | None]
    problems: list[tuple[int, str, bytes]]
    body_bytes: int
    """Size of the decoded (decompressed) body: what decoding it cost in memory."""
    plain: bool = False
    """Every record was decoded in the common form (:class:`PlainRecord`): event time
    storable, content type raw or JSON, key none or a string of at most
    :data:`MAX_KEY_CHARS`, no headers; :func:`~broker.protocol.validation.record_problems`
    need not check those again."""

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.records) - 1

    @property
    def span(self) -> tuple[str, str, int, int, int]:
        return (self.edge, self.stream, self.epoch, self.first_seq, self.last_seq)


class _Envelope(msgspec.Struct):
    """A batch with its records left undecoded (a view into the body)."""

    v: int
    edge: str
    stream: str
    epoch: int
    first_seq: int
    records: msgspec.Raw


class _PlainBatch(msgspec.Struct):
    """A batch whose records all have :class:`PlainRecord`'s shape, decoded in one call."""

    v: int
    edge: str
    stream: str
    epoch: int
    first_seq: int
    records: list[PlainRecord]


ONE_CALL_MAX_BYTES: Final = 64 * 1024
"""Bodies up to this size are first decoded in one call, envelope and records together
(:func:`decode_records`): a fleet's batch is a few records, and the two calls, the
records' view and the count read between them were half its decoding (measured: 4.8
against 6.9 µs for a 10-record batch). A body this size holds at most a few thousand
records, so decoding them before their count is checked stays cheap."""
_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)
_plain_batch_decoder = msgspec.msgpack.Decoder(_PlainBatch)
_records_decoder = msgspec.msgpack.Decoder(list[Record])
_plain_records_decoder = msgspec.msgpack.Decoder(list[PlainRecord])
_raw_list_decoder = msgspec.msgpack.Decoder(list[msgspec.Raw])
_record_decoder = msgspec.msgpack.Decoder(Record)


def decode_records(data: bytes, headers: Mapping[str, str] | None = None) -> DecodedBatch:
    """Decode a batch's envelope, then its records one by one.

    Raises:
        DecodeError: the body is not a batch with a valid envelope (with
            ``span`` set when the envelope named a valid identity range, e.g. a
            batch over the record cap or whose record array is unreadable).
    """
    try:
        body = _decompress(data, (headers or {}).get(ENCODING_HEADER))
        if len(body) <= ONE_CALL_MAX_BYTES and (decoded := _plain_batch(body)) is not None:
            return decoded
        env = _envelope_decoder.decode(body)
    except DecodeError:
        raise
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"malformed batch: {exc}") from exc
    except Exception as exc:  # decoding must be total: nothing else may escape
        raise DecodeError(f"malformed batch: {type(exc).__name__}: {exc}") from exc
    count = _validate_envelope(env)
    span = (env.edge, env.stream, env.epoch, env.first_seq, env.first_seq + count - 1)
    if count > MAX_BATCH_RECORDS:
        raise DecodeError(f"batch of {count} records exceeds {MAX_BATCH_RECORDS}", span=span)
    problems: list[tuple[int, str, bytes]] = []
    records: list[Record | None]
    try:
        # The common form first: its checks are made as the fields are read.
        records = _plain_records_decoder.decode(env.records)  # type: ignore[assignment]
        plain = True
    except Exception:  # some record is not in it: decode and check as any record
        records, plain = _any_records(env.records, problems, span), False
    if len(records) != count:
        raise DecodeError(f"record array holds {len(records)}, header says {count}", span=span)
    if plain:
        return DecodedBatch(env.edge, env.stream, env.epoch, env.first_seq, records, problems,
                            len(body), plain=True)
    if problems or not _all_sound(records):  # type: ignore[arg-type]  # no None: no problems
        for i, rec in enumerate(records):
            if rec is None:
                continue
            problem = _record_structure_problem(rec)
            if problem:
                records[i] = None
                problems.append((i, problem, _encoder.encode(rec)))
        problems.sort(key=lambda p: p[0])
    return DecodedBatch(env.edge, env.stream, env.epoch, env.first_seq, records, problems,
                        len(body))


def _plain_batch(body: bytes) -> DecodedBatch | None:
    """``body`` decoded in one call, when it is a valid batch of plain records only;
    None for anything else, which :func:`decode_records` then decodes the usual way
    (and so gives its usual reasons)."""
    try:
        b = _plain_batch_decoder.decode(body)
    except Exception:  # not in the common form, or not a batch: the usual way says why
        return None
    count = len(b.records)
    if not (b.v == WIRE_VERSION and _valid_token(b.edge) and _valid_token(b.stream)
            and 0 < b.epoch <= MAX_EPOCH and 0 < count <= MAX_BATCH_RECORDS
            and 0 < b.first_seq <= MAX_SEQ - count + 1):
        return None
    return DecodedBatch(b.edge, b.stream, b.epoch, b.first_seq,
                        b.records,  # type: ignore[arg-type]  # PlainRecord is a Record
                        [], len(body), plain=True)


def _any_records(data: msgspec.Raw, problems: list[tuple[int, str, bytes]],
                 span: tuple[str, str, int, int, int]) -> list[Record | None]:
    """The records of ``data`` as :class:`Record`; a malformed one is None, its reason
    added to ``problems``."""
    try:
        return list(_records_decoder.decode(data))
    except Exception:  # some record is malformed: find which, one by one
        try:
            raws = _raw_list_decoder.decode(data)
        except Exception as exc:
            raise DecodeError(f"malformed record array: {exc}", span=span) from exc
    records: list[Record | None] = []
    for i, raw in enumerate(raws):
        try:
            records.append(_record_decoder.decode(raw))
        except Exception as exc:
            records.append(None)
            problems.append((i, f"malformed record: {exc}", bytes(raw)))
    return records


def _array_count(raw: msgspec.Raw) -> int:
    view = memoryview(raw)
    if not view:
        raise DecodeError("malformed batch: empty records field")
    tag = view[0]
    if 0x90 <= tag <= 0x9F:  # a fixarray: a fleet's small batch, no header bytes to copy
        return tag & 0x0F
    head = bytes(view[:5])
    if tag == 0xDC and len(head) >= 3:
        return int.from_bytes(head[1:3], "big")
    if tag == 0xDD and len(head) >= 5:
        return int.from_bytes(head[1:5], "big")
    raise DecodeError("malformed batch: records is not an array")


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


_TOKEN_MAX_CHARS = 64
"""No valid token is longer (:data:`broker.protocol.tokens.TOKEN_PATTERN`)."""


def _valid_token(value: str) -> bool:
    """:func:`is_valid_token`, remembered: an ingest sees the same few thousand edge ids
    and stream names in every group (a fleet's batch is a few records: the regex
    match per batch showed in its profile). A string longer than any token is refused
    before the cache, so what the cache holds stays small (16,384 short strings at
    most) whatever a sender puts in an envelope."""
    return len(value) <= _TOKEN_MAX_CHARS and _remembered_token(value)


@functools.lru_cache(maxsize=16_384)
def _remembered_token(value: str) -> bool:
    return is_valid_token(value)


def _validate_envelope(env: _Envelope) -> int:
    """Check the envelope; returns the number of records it announces."""
    if env.v != WIRE_VERSION:
        raise DecodeError(f"unsupported wire version {env.v} (this build reads {WIRE_VERSION})")
    if not _valid_token(env.edge):
        raise DecodeError(f"invalid edge id {env.edge!r}")
    if not _valid_token(env.stream):
        raise DecodeError(f"invalid stream name {env.stream!r}")
    if not 0 < env.epoch <= MAX_EPOCH:
        raise DecodeError(f"epoch {env.epoch} out of range 1..2^63-1")
    count = _array_count(env.records)
    if not count:
        raise DecodeError("batch has no records")
    if env.first_seq < 1 or env.first_seq + count - 1 > MAX_SEQ:
        raise DecodeError(
            f"seq range {env.first_seq}..{env.first_seq + count - 1} out of range 1..2^63-2"
        )
    return count


def _all_sound(records: list[Record]) -> bool:
    """True only when :func:`_record_structure_problem` finds nothing in any of
    ``records`` (decoded: ints are ints, keys str or None), decided by whole columns
    (``map``, ``min``, ``max``) instead of a call per record."""
    stamps = list(map(_TS, records))
    if min(stamps) < _INT64_MIN or max(stamps) > _INT64_MAX:
        return False
    if not set(map(_CT, records)) <= _CONTENT_TYPES:
        return False
    keys = [k for k in map(_KEY, records) if k is not None]
    return not keys or max(map(len, keys)) <= MAX_KEY_CHARS


_TS = operator.attrgetter("ts")
_CT = operator.attrgetter("ct")
_KEY = operator.attrgetter("key")
_CONTENT_TYPES: Final = frozenset((CT_RAW, CT_JSON))


def _record_structure_problem(rec: Record) -> str | None:
    """What the wire format itself forbids in a record (storability is
    :mod:`broker.protocol.validation`'s job)."""
    if not _INT64_MIN <= rec.ts <= _INT64_MAX:
        return f"timestamp {rec.ts} outside int64"
    if rec.ct not in (CT_RAW, CT_JSON):
        return f"unknown content type {rec.ct}"
    if rec.key is not None and len(rec.key) > MAX_KEY_CHARS:
        return f"key longer than {MAX_KEY_CHARS} characters"
    return None
