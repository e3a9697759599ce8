"""Wire format v1: round trips, strictness, and totality of decoding."""

from __future__ import annotations

from unittest import mock

import msgspec
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import DecodeError
from broker.protocol import wire
from broker.protocol.wire import (
    CT_JSON,
    CT_RAW,
    ENCODING_HEADER,
    MAX_EPOCH,
    MAX_SEQ,
    Batch,
    Record,
    _all_sound,
    _record_structure_problem,
    decode_batch,
    decode_records,
    encode_batch,
    msg_id,
)

tokens = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
records = st.builds(
    Record,
    ts=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    ct=st.sampled_from([CT_RAW, CT_JSON]),
    payload=st.binary(max_size=300),
    key=st.none() | st.text(max_size=50),
    headers=st.none() | st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
)
batches = st.builds(
    Batch,
    v=st.just(1),
    edge=tokens,
    stream=tokens,
    epoch=st.integers(min_value=1, max_value=MAX_SEQ),
    first_seq=st.integers(min_value=1, max_value=2**40),
    records=st.lists(records, min_size=1, max_size=20),
)


def _batch(**overrides: object) -> Batch:
    fields: dict[str, object] = {
        "v": 1,
        "edge": "edge-1",
        "stream": "telemetry",
        "epoch": 7,
        "first_seq": 1,
        "records": [Record(1_700_000_000_000_000, CT_JSON, b'{"a":1}', "k", {"h": "v"})],
    }
    fields.update(overrides)
    return Batch(**fields)  # type: ignore[arg-type]


@given(batches, st.sampled_from([None, 1, 3]))
@settings(max_examples=200)
def test_every_valid_batch_round_trips(batch: Batch, level: int | None) -> None:
    """Any valid batch decodes to itself, compressed or not."""
    body, headers = encode_batch(batch, zstd_level=level)
    assert decode_batch(body, headers, strict=True) == batch


@given(st.binary(max_size=2000))
@settings(max_examples=500)
def test_arbitrary_bytes_only_ever_raise_decode_error(data: bytes) -> None:
    """Decoding is total: garbage gives DecodeError, never another exception."""
    try:
        decode_batch(data)
    except DecodeError as exc:
        assert str(exc)


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text()
        | st.binary(),
        lambda inner: (
            st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=6)
        ),
        max_leaves=30,
    )
)
@settings(max_examples=300)
def test_arbitrary_msgpack_values_only_ever_raise_decode_error(value: object) -> None:
    """Well-formed MessagePack of the wrong shape is a DecodeError too."""
    data = msgspec.msgpack.encode(value)
    with pytest.raises(DecodeError):
        decode_batch(data)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"v": 2}, "unsupported wire version"),
        ({"edge": "a.b"}, "invalid edge id"),
        ({"stream": "*"}, "invalid stream name"),
        ({"epoch": 0}, "epoch"),
        ({"first_seq": 0}, "seq range"),
        ({"first_seq": MAX_SEQ}, None),
        # int8's largest value is no seq: a span's upper bound (last + 1) must fit int8
        ({"first_seq": MAX_SEQ + 1}, "seq range"),
        ({"records": []}, "no records"),
        ({"records": [Record(0, 9, b"x")]}, "unknown content type"),
        ({"records": [Record(0, 0, b"x", "k" * 1025)]}, "key longer"),
    ],
)
def test_invalid_batches_are_rejected_with_a_reason(
    overrides: dict[str, object], reason: str | None
) -> None:
    """Each invariant of the format has its own error message."""
    body, _ = encode_batch(_batch(**overrides))
    if reason is None:  # MAX_SEQ as first seq of a one-record batch is the last valid one
        assert decode_batch(body).last_seq == MAX_SEQ
        return
    with pytest.raises(DecodeError, match=reason):
        decode_batch(body)


def test_strict_decoding_rejects_unknown_fields_that_lenient_ignores() -> None:
    """Production ignores fields from a newer writer; tests see them."""
    raw = msgspec.msgpack.decode(encode_batch(_batch())[0])
    raw["future"] = 1
    body = msgspec.msgpack.encode(raw)
    assert decode_batch(body).edge == "edge-1"
    with pytest.raises(DecodeError, match="unknown batch fields"):
        decode_batch(body, strict=True)
    raw.pop("future")
    raw["records"][0].append("extra")
    with pytest.raises(DecodeError, match="record 0 has 6 fields"):
        decode_batch(msgspec.msgpack.encode(raw), strict=True)


def test_unknown_or_broken_compression_is_a_decode_error() -> None:
    body, _ = encode_batch(_batch())
    with pytest.raises(DecodeError, match="unknown Es-Encoding"):
        decode_batch(body, {ENCODING_HEADER: "gzip"})
    with pytest.raises(DecodeError, match="invalid zstd"):
        decode_batch(body, {ENCODING_HEADER: "zstd"})


def test_a_zstd_bomb_is_refused() -> None:
    """A small body that expands past the limit is rejected, not allocated."""
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (65 * 1024 * 1024))
    with pytest.raises(DecodeError):
        decode_batch(bomb, {ENCODING_HEADER: "zstd"})


def test_msg_id_names_the_identity_range() -> None:
    assert msg_id("e", "s", 9, 1, 100) == "e.s.9.1-100"


@given(st.lists(st.tuples(
    st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([2**63, 2**64 - 1])),
    st.sampled_from([CT_RAW, CT_JSON, 2, 127]),
    st.none() | st.text(max_size=3) | st.just("k" * 1025) | st.just("é" * 1024)),
    min_size=1, max_size=12))
@settings(max_examples=300)
def test_each_record_gets_the_structure_problem_checking_it_alone_finds(
        fields: list[tuple[int, int, str | None]]) -> None:
    """Whether the whole records column passes at once (the quick way) or not, a
    record is left out with exactly the reason ``_record_structure_problem`` gives it."""
    raw = [[ts, ct, b"{}", key, None] for ts, ct, key in fields]
    body = msgspec.msgpack.encode({"v": 1, "edge": "e", "stream": "s", "epoch": 1,
                                   "first_seq": 1, "records": raw})
    decoded = decode_records(body)
    expected = []
    for i, (ts, ct, key) in enumerate(fields):
        problem = _record_structure_problem(Record(ts, ct, b"{}", key))
        if problem:
            expected.append((i, problem))
    assert [(i, reason) for i, reason, _ in decoded.problems] == expected
    assert [i for i, r in enumerate(decoded.records) if r is None] == [i for i, _ in expected]


def test_a_sound_records_column_is_checked_at_once() -> None:
    sound = [Record(-(2**63), CT_RAW, b""), Record(2**63 - 1, CT_JSON, b"1", "k" * 1024)]
    assert _all_sound(sound)
    for unsound in (Record(2**63, CT_RAW, b""), Record(0, 2, b""),
                    Record(0, CT_RAW, b"", "k" * 1025)):
        assert not _all_sound([*sound, unsound])


# -- decode_records' one-call path ------------------------------------------------------------

_TS = 1_700_000_000_000_000


def _plain(n: int = 3) -> list[Record]:
    return [Record(_TS + i, CT_JSON if i % 2 else CT_RAW, b'{"i":%d}' % i,
                   None if i % 3 else f"k{i}", None) for i in range(n)]


def _outcome(body: bytes, *, one_call: bool) -> object:
    """What decode_records gives for ``body``, its one-call path allowed or not."""
    limit = wire.ONE_CALL_MAX_BYTES if one_call else -1
    with mock.patch.object(wire, "ONE_CALL_MAX_BYTES", limit):
        try:
            return decode_records(body)
        except DecodeError as exc:
            return ("refused", str(exc), exc.span)


ONE_CALL_CASES = [
    Batch(1, "edge-1", "telemetry", 7, 1, _plain()),
    Batch(1, "edge-1", "telemetry", MAX_SEQ, MAX_SEQ - 2, _plain()),    # the last seqs
    Batch(1, "edge-1", "telemetry", 7, MAX_SEQ - 1, _plain()),          # one past them
    Batch(1, "edge-1", "telemetry", MAX_EPOCH, 1, _plain()),            # the last epoch
    Batch(1, "edge-1", "telemetry", MAX_EPOCH + 1, 1, _plain()),        # one past it
    Batch(1, "edge-1", "telemetry", 0, 1, _plain()),                    # epoch 0
    Batch(1, "edge-1", "telemetry", 7, 0, _plain()),                    # seq 0
    Batch(2, "edge-1", "telemetry", 7, 1, _plain()),                    # another version
    Batch(1, "edge 1", "telemetry", 7, 1, _plain()),                    # not a token
    Batch(1, "edge-1", "t" * 65, 7, 1, _plain()),                       # too long a token
    Batch(1, "edge-1", "telemetry", 7, 1, []),                          # no records
    Batch(1, "edge-1", "telemetry", 7, 1,                               # one with headers
          [*_plain(2), Record(_TS, CT_JSON, b"1", None, {"h": "v"})]),
    Batch(1, "edge-1", "telemetry", 7, 1,                               # a bad event time
          [*_plain(2), Record(-1, CT_JSON, b"1", None, None)]),
]


@pytest.mark.parametrize("batch", ONE_CALL_CASES)
def test_a_batch_decodes_the_same_in_one_call_as_in_two(batch: Batch) -> None:
    body = encode_batch(batch)[0]
    assert _outcome(body, one_call=True) == _outcome(body, one_call=False)


def test_a_fleets_small_batch_takes_the_one_call_path_and_a_big_one_does_not() -> None:
    small = encode_batch(Batch(1, "edge-1", "telemetry", 7, 1, _plain(10)))[0]
    assert wire._plain_batch(small) == decode_records(small)
    assert decode_records(small).plain
    big = encode_batch(Batch(1, "edge-1", "telemetry", 7, 1, [
        Record(_TS, CT_JSON, b"1" * 1000, None, None)] * 100))[0]
    assert len(big) > wire.ONE_CALL_MAX_BYTES
    with mock.patch.object(wire, "_plain_batch", side_effect=AssertionError("one call")):
        assert decode_records(big).plain
        with pytest.raises(DecodeError, match="one call"):
            decode_records(small)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_batches_decode_the_same_in_one_call_as_in_two(data: st.DataObject) -> None:
    body = bytearray(encode_batch(data.draw(st.sampled_from(ONE_CALL_CASES)))[0])
    for _ in range(data.draw(st.integers(0, 3))):
        at = data.draw(st.integers(0, len(body) - 1))
        body[at] = data.draw(st.integers(0, 255))
    assert _outcome(bytes(body), one_call=True) == _outcome(bytes(body), one_call=False)
