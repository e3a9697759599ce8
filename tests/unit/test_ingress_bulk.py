"""The common MessagePack request, checked in bulk and stored as its own record bytes,
takes exactly the requests the general way would store, and stores what it would store."""

from __future__ import annotations

import struct
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.protocol.ingress import IngressRequest
from broker.protocol.validation import record_problems
from broker.protocol.wire import (
    CT_JSON,
    CT_RAW,
    MAX_KEY_CHARS,
    MAX_TS_US,
    MIN_TS_US,
    Record,
    array_header,
    decode_batch,
    encode_batch_parts,
)
from broker.settings import StreamPolicy
from edge_bridge.buffer import Buffer
from edge_bridge.buffer.chunks import (
    CHUNK_MAX_BYTES,
    CHUNK_MAX_RECORDS,
    STORED_RECORD_OVERHEAD_BYTES,
    encode_chunks,
    split_chunk,
)
from edge_bridge.ingress_bulk import plain_request
from edge_bridge.sdk._records import encode_request

MAX_RECORD = 1024**2
_request = msgspec.msgpack.Decoder(IngressRequest)
_records = msgspec.msgpack.Decoder(list[Record])


def general_way(body: bytes, max_record_bytes: int = MAX_RECORD) -> list[Record] | None:
    """The records the general way stores for ``body``, or None where it refuses."""
    try:
        records = _request.decode(body).records
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if not records or record_problems(records) or any(
            len(r.payload) > max_record_bytes for r in records):
        return None
    return records


def stored_records(chunks_bodies: list[tuple[int, bytes]]) -> list[Record]:
    return [r for count, body in chunks_bodies
            for r in _records.decode(array_header(count) + body)]


def test_an_sdk_request_is_stored_as_its_own_record_bytes() -> None:
    """One chunk whose body is the request's records array without its header: the same
    bytes, and the same charge, as the general way's decode and re-encode."""
    records = [(1_700_000_000_000_000 + i, CT_JSON, b'{"t":%d,"s":"ok"}' % i, f"dev-{i % 7}",
                None) for i in range(CHUNK_MAX_RECORDS)]
    records[3] = (0, CT_RAW, b"\x00\xff raw", None, None)
    records[4] = (MAX_TS_US, CT_JSON, '"é😀"'.encode(), "ключ-ü", None)
    body = encode_request("producer-1", 42, records)

    plain = plain_request(body, max_record_bytes=MAX_RECORD)

    assert plain is not None
    assert (plain.producer, plain.request_seq, plain.records) == ("producer-1", 42, 1000)
    [chunk] = plain.chunks
    assert body.endswith(chunk.body) and len(chunk.body) == len(body) - body.index(
        array_header(1000)) - len(array_header(1000))
    general = general_way(body)
    assert general is not None
    assert encode_chunks(general) == plain.chunks
    assert chunk.size == len(chunk.body) + STORED_RECORD_OVERHEAD_BYTES * 1000


def test_requests_beyond_one_chunk_are_cut_as_the_general_way_cuts_them() -> None:
    many = [(1, CT_JSON, b"1", None, None)] * (CHUNK_MAX_RECORDS + 1)
    large = [(1, CT_RAW, b"x" * 1000, None, None)] * (CHUNK_MAX_BYTES // 1000 + 1)
    for records in (many, large):
        body = encode_request("p", 1, records)
        plain = plain_request(body, max_record_bytes=MAX_RECORD)
        general = general_way(body)
        assert plain is not None and general is not None
        assert len(plain.chunks) == 2
        assert plain.chunks == encode_chunks(general)


def _hand_encoded(record: bytes) -> bytes:
    """A request of one record whose array the test wrote byte by byte."""
    return _hand_encoded_many([record])


def test_other_valid_encodings_are_kept_and_read_back_as_the_same_records() -> None:
    """A producer in another language may write a small ts as uint64, a short payload
    as bin32 and a key as str16: still the wire format. The record is stored as it came
    and decodes to the record the general way would have stored."""
    record = (b"\x95" + b"\xcf" + struct.pack(">Q", 5) + b"\xcc\x01"
              + b"\xc6" + struct.pack(">I", 3) + b"[1]"
              + b"\xda" + struct.pack(">H", 2) + b"ab" + b"\xc0")
    body = _hand_encoded(record)

    plain = plain_request(body, max_record_bytes=MAX_RECORD)

    assert plain is not None
    assert [c.body for c in plain.chunks] == [record]
    assert stored_records([(1, record)]) == general_way(body) == [
        Record(5, CT_JSON, b"[1]", "ab", None)]


@pytest.mark.parametrize("record", [
    pytest.param(msgspec.msgpack.encode([1, CT_RAW, b"x"]), id="three elements"),
    pytest.param(msgspec.msgpack.encode([1, CT_RAW, b"x", None, None, 7]), id="six elements"),
    pytest.param(msgspec.msgpack.encode([1, CT_RAW, b"x", None, {"h": "v"}]), id="headers"),
])
def test_other_shapes_are_left_to_the_general_way(record: bytes) -> None:
    """Valid records outside the plain shape: the general way stores them (re-encoded)."""
    body = _hand_encoded(record)
    assert plain_request(body, max_record_bytes=MAX_RECORD) is None
    assert general_way(body) is not None


@pytest.mark.parametrize("record", [
    Record(MIN_TS_US - 1, CT_RAW, b""), Record(MAX_TS_US + 1, CT_RAW, b""),
    Record(0, 2, b""), Record(0, CT_RAW, b"", "k" * (MAX_KEY_CHARS + 1)),
    Record(0, CT_RAW, b"", "a\x00b"), Record(0, CT_JSON, b"{"),
    Record(0, CT_JSON, b'"\\u0000"'), Record(0, CT_JSON, b"1e200000"),
    Record(0, CT_JSON, b"[" * 300 + b"]" * 300), Record(0, CT_JSON, b'"\xed\xa0\x80"'),
])
def test_every_refused_record_is_left_to_the_general_way(record: Record) -> None:
    """The general way refuses it (and words the refusal); the bulk check never takes it,
    among good records or alone."""
    good = Record(1, CT_JSON, b"{}", "k")
    for records in ([record], [good, record, good]):
        body = msgspec.msgpack.encode(IngressRequest("p", 1, records))
        assert general_way(body) is None
        assert plain_request(body, max_record_bytes=MAX_RECORD) is None


def test_requests_the_general_way_refuses_as_a_whole_are_left_to_it() -> None:
    float_ts = _hand_encoded(msgspec.msgpack.encode([1.5, CT_RAW, b"x", None, None]))
    empty = msgspec.msgpack.encode(IngressRequest("p", 1, []))
    no_producer = msgspec.msgpack.encode({"request_seq": 1, "records": [[1, 0, b"", None,
                                                                         None]]})
    trailing = encode_request("p", 1, [(1, CT_RAW, b"x", None, None)]) + b"\xc0"
    good = encode_request("p", 1, [(1, CT_RAW, b"x", None, None)])
    # "records" twice: a bad first value, a good second one (a decoder keeping the
    # last would store what the general way refuses); and a fourth, unknown key
    twice = (b"\x84" + float_ts[1:] + msgspec.msgpack.encode("records")
             + msgspec.msgpack.encode([[1, CT_RAW, b"x", None, None]]))
    extra = b"\x84" + good[1:] + msgspec.msgpack.encode("x") + msgspec.msgpack.encode(1)
    assert plain_request(good, max_record_bytes=MAX_RECORD) is not None
    assert general_way(extra) is not None  # stored by the general way, which reads it
    assert plain_request(extra, max_record_bytes=MAX_RECORD) is None
    for body in (float_ts, empty, no_producer, trailing, twice, b"", b"\x81"):
        assert general_way(body) is None
        assert plain_request(body, max_record_bytes=MAX_RECORD) is None
    too_large = encode_request("p", 1, [(1, CT_RAW, b"x" * 101, None, None)])
    assert general_way(too_large, 100) is None
    assert plain_request(too_large, max_record_bytes=100) is None


RECORD_FIELDS = st.tuples(
    st.sampled_from([0, 1_700_000_000_000_000, MIN_TS_US, MIN_TS_US - 1, MAX_TS_US,
                     MAX_TS_US + 1, -(2**63)]),
    st.sampled_from([CT_RAW, CT_JSON, CT_JSON, 2]),
    st.one_of(st.sampled_from([b"{}", b'{"a":[1,2.5,"x"]}', b"1e400", b"1e200000", b'"\\u0000"',
                               b'"\\\\u0000"', b"[1", b"", b"\xff", '"é"'.encode()]),
              st.binary(max_size=20)),
    st.one_of(st.none(), st.text(max_size=6), st.just("a\x00"), st.just("k" * 1025)),
    st.one_of(st.none(), st.none(), st.just({"h": "v"})),
)


@given(st.lists(RECORD_FIELDS, max_size=12), st.integers(1, 64))
@settings(max_examples=600, deadline=None)
def test_the_bulk_check_stores_what_the_general_way_stores_or_leaves_it(
        records: list[tuple[int, int, bytes, str | None, dict[str, str] | None]],
        max_record_bytes: int) -> None:
    """Where the bulk check takes a request, the general way stores it too, and the
    stored bytes read back as exactly the records the general way would store."""
    body = encode_request("p", 1, records)
    plain = plain_request(body, max_record_bytes=max_record_bytes)
    if plain is None:
        return
    general = general_way(body, max_record_bytes)
    assert general is not None
    assert stored_records([(c.records, c.body) for c in plain.chunks]) == general
    assert [r for c in plain.chunks for r in split_chunk(c.body, c.records)] == [
        msgspec.msgpack.encode(r) for r in general]


STORABLE_FIELDS = st.tuples(
    st.integers(MIN_TS_US, MAX_TS_US),
    st.sampled_from([CT_RAW, CT_JSON]),
    st.sampled_from([b"{}", b'{"a":[1,2.5,"x"]}', b"1e200", b'"a\\\\nb"', '"é"'.encode(),
                     b"[]", b"null"]),
    # A key is any text but NUL and lone surrogates (which no UTF-8 can carry; the SDK
    # refuses them before a request is made).
    st.one_of(st.none(), st.text(alphabet=st.characters(blacklist_characters="\x00",
                                                        blacklist_categories=("Cs",)),
                                 max_size=6)),
    st.none(),
)


@given(st.lists(STORABLE_FIELDS, min_size=1, max_size=40))
@settings(max_examples=200, deadline=None)
def test_requests_of_storable_records_are_taken_by_the_bulk_check(
        records: list[tuple[int, int, bytes, str | None, None]]) -> None:
    """The accepting side of the property above: a request of plainly storable records
    (the bulk check may leave a doubtful one to the general way, e.g. a payload
    spelling ``\\u0000``) is taken, and stored as exactly the records the general way
    stores."""
    body = encode_request("p", 1, records)
    plain = plain_request(body, max_record_bytes=MAX_RECORD)
    general = general_way(body)
    assert plain is not None and general is not None and plain.records == len(records)
    assert stored_records([(c.records, c.body) for c in plain.chunks]) == general


async def test_kept_bytes_travel_as_a_batch_the_ingest_decodes_strictly(tmp_path: Path) -> None:
    """A request in another valid encoding, stored as it came (``Buffer.append``), read by
    the shipper's read (cut mid-chunk too) and spliced into a batch, decodes strictly,
    as the ingest decodes it, to the records the general way would have stored."""
    record = (b"\x95" + b"\xd3" + struct.pack(">q", 1_700_000_000_000_000) + b"\xd0\x01"
              + b"\xc5" + struct.pack(">H", 7) + b'{"a":1}' + b"\xd9\x03dev" + b"\xc0")
    body = _hand_encoded_many([record, record, record])
    plain = plain_request(body, max_record_bytes=MAX_RECORD)
    assert plain is not None and [c.body for c in plain.chunks] == [record * 3]
    async with Buffer(tmp_path / "buf", max_bytes=10**9,
                      policy_for=lambda s: StreamPolicy()) as buf:
        stored = await buf.append("s", plain.chunks, producer=plain.producer,
                                         request_seq=plain.request_seq)
        runs = (await buf.read_runs("s", 0, max_records=2, max_bytes=10**6)
                + await buf.read_runs("s", 2, max_records=2, max_bytes=10**6))
    batches = [decode_batch(encode_batch_parts("edge-1", "s", epoch=run.epoch,
                                               first_seq=run.first_seq, count=run.count,
                                               parts=run.parts), strict=True)
               for run in runs]
    assert [(b.first_seq, b.epoch) for b in batches] == [(1, stored.epoch), (3, stored.epoch)]
    assert [r for b in batches for r in b.records] == general_way(body) == [
        Record(1_700_000_000_000_000, CT_JSON, b'{"a":1}', "dev")] * 3


def _hand_encoded_many(records: list[bytes]) -> bytes:
    """A request of records whose arrays the test wrote byte by byte."""
    head = msgspec.msgpack.encode({"producer": "p", "request_seq": 1})
    # A third entry in the two-entry fixmap: records = [...].
    return bytes([head[0] + 1]) + head[1:] + msgspec.msgpack.encode("records") + (
        array_header(len(records)) + b"".join(records))
