"""The shared record validator: exactly what the cloud stores, a reason for the rest;
and the SDK's publish-time checks built on it."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from broker.errors import InvalidInput, InvalidRecords
from broker.protocol.ingress import check_headers, check_key, encode_payload, to_ts_us
from broker.protocol.validation import (
    MAX_JSON_DEPTH,
    _all_plainly_storable,
    check_records,
    json_all_plainly_valid,
    json_problem,
    record_problem,
    record_problems,
)
from broker.protocol.wire import (
    CT_JSON,
    CT_RAW,
    MAX_KEY_CHARS,
    MAX_TS_US,
    MIN_TS_US,
    WIRE_VERSION,
    Batch,
    Record,
    decode_records,
    encode_batch,
)


def test_the_ts_bounds_are_the_first_and_last_microsecond_of_four_digit_years() -> None:
    assert datetime.fromtimestamp(MIN_TS_US / 1e6, UTC).year == 1
    assert to_ts_us(datetime(9999, 12, 31, 23, 59, 59, 999999, UTC)) == MAX_TS_US
    assert to_ts_us(datetime(1, 1, 1, tzinfo=UTC)) == MIN_TS_US


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (Record(MIN_TS_US - 1, CT_RAW, b""), "outside 0001-01-01"),
        (Record(MAX_TS_US + 1, CT_RAW, b""), "outside 0001-01-01"),
        (Record(-(2**63), CT_RAW, b""), "outside"),
        (Record(0, 5, b""), "unknown content type"),
        (Record(0, CT_JSON, b'{"a": "\\u0000"}'), "\\\\u0000"),
        (Record(0, CT_JSON, b'["\\ud800"]'), "invalid JSON"),
        (Record(0, CT_JSON, b"{"), "invalid JSON"),
        (Record(0, CT_JSON, b"\xff"), "invalid JSON"),
        (Record(0, CT_JSON, b"NaN"), "invalid JSON"),
        (Record(0, CT_JSON, b"1e200000"), "numeric"),
        (Record(0, CT_JSON, b"[" * 1000 + b"]" * 1000), "nested 1000 deep"),
        (Record(0, CT_RAW, b"", "a\x00b"), "key contains NUL"),
        (Record(0, CT_RAW, b"", "x" * 1025), "exceeds 1024"),
        (Record(0, CT_RAW, b"", None, {"h": "\x00"}), "NUL"),
        (Record(0, CT_RAW, b"", None, {"h": "x" * 70_000}), "exceed"),
    ],
)
def test_each_rule_refuses_with_its_reason(record: Record, reason: str) -> None:
    problem = record_problem(record)
    assert problem is not None and re.search(reason, problem), problem


STRINGS_OF_BRACKETS = b"[" + b",".join([b'"' + b"[" * 64 + b'\\"{"'] * 10) + b"]"


@pytest.mark.parametrize(
    "payload",
    [b"1e400", b'"\\\\u0000"', b'{"a": [1, {"b": null}]}', b"[" * MAX_JSON_DEPTH + b"]" *
     MAX_JSON_DEPTH, STRINGS_OF_BRACKETS,
     '"é😀"'.encode()],
)
def test_what_jsonb_stores_passes(payload: bytes) -> None:
    """Huge numbers (jsonb numbers are numeric), an escaped backslash before u0000,
    nesting at the limit and brackets inside strings are all fine."""
    assert json_problem(payload) is None


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_json_checks_are_total(data: bytes) -> None:
    """Whatever the bytes: a reason or None, never an exception."""
    assert json_problem(data) is None or json_problem(data)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=5),
    max_leaves=20,
)


@given(st.builds(
    Record,
    st.sampled_from([0, MIN_TS_US, MIN_TS_US - 1, MAX_TS_US, MAX_TS_US + 1, 1_700_000_000]),
    st.sampled_from([CT_RAW, CT_JSON, 2]),
    st.one_of(st.binary(max_size=50), JSON_VALUES.map(msgspec.json.encode)),
    st.one_of(st.none(), st.text(max_size=10), st.just("a\x00"), st.just("k" * 1025)),
    st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)),
))
@settings(max_examples=400)
def test_checking_many_records_says_what_checking_each_says(record: Record) -> None:
    """The inline common case of ``record_problems`` agrees with ``record_problem``."""
    problem = record_problem(record)
    assert record_problems([record]) == ([] if problem is None else [(0, problem)])


# Pieces that are JSON only together, or JSON that jsonb refuses: what the joined check
# must not take for a list of valid payloads.
JSON_PIECES = st.sampled_from([
    b"[1", b"2]", b"3,4", b'"a', b'b"', b"{", b"}", b'"k":1', b",", b" ", b" 1", b"1 ", b"",
    b"1e200000", b"-1E-20000", b"1e+99999", b"0." + b"0" * 16_400 + b"1", b'"\\u0000"',
    b'"\\\\u0000"', b'"\\ud800"', b'"\\udc00x"', b"\xff", '"é"'.encode(), b'"\xed\xa0\x80"',
    b"[" * 300 + b"]" * 300, b'"' + b"[" * 300 + b'"', b"NaN", b"01", b"1.", b"tru", b"null",
    b"1e308", b"1e400", b"123456789" * 40, b'{"a":[1,{"b":null}]}', b"[]", b"{}",
])


@given(st.lists(st.one_of(JSON_PIECES, JSON_VALUES.map(msgspec.json.encode),
                          st.binary(max_size=12)), min_size=1, max_size=8))
@settings(max_examples=1000)
def test_the_joined_json_check_never_passes_what_json_problem_refuses(
        payloads: list[bytes]) -> None:
    """Where the check of all payloads at once says yes, each payload's own check says
    nothing is wrong (where it says no, each payload is checked on its own)."""
    if json_all_plainly_valid(payloads):
        assert [json_problem(p) for p in payloads] == [None] * len(payloads)


@pytest.mark.parametrize("payloads", [
    [b"[1", b"2]", b"3,4"], [b'"a', b'b"', b"1,2"], [b"1", b"2,3", b"4"], [b" 1", b"2"],
    [b"1e200000"], [b'"\\u0000"'], [b'"\xff"'], [b'"\xed\xa0\x80"'],
    [b"[" * 300 + b"]" * 300], [b""], [b"{}", b"{"],
])
def test_the_joined_json_check_leaves_doubtful_payloads_to_json_problem(
        payloads: list[bytes]) -> None:
    assert not json_all_plainly_valid(payloads)


def test_the_joined_json_check_passes_common_telemetry() -> None:
    """What the bridge checks for every request (the bench's payloads) takes the quick way."""
    payloads = [msgspec.json.encode({"device": f"sensor-{i:03d}", "seq": i, "t": 21.5 + i,
                                     "tags": ["a", "é"], "loc": {"line": 6, "cell": None}})
                for i in range(1000)]
    assert json_all_plainly_valid(payloads)
    assert record_problems([Record(0, CT_JSON, p) for p in payloads]) == []


def test_check_records_lists_every_bad_index() -> None:
    good = Record(0, CT_JSON, b"1")
    with pytest.raises(InvalidRecords) as caught:
        check_records([good, Record(0, CT_JSON, b"{"), good, Record(MAX_TS_US + 1, 0, b"")])
    assert [i for i, _ in caught.value.problems] == [1, 3]


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: to_ts_us(1e13), "storable range"),
        (lambda: to_ts_us(-9_223_000_000_000), "storable range"),
        (lambda: check_key("a\x00"), "NUL"),
        (lambda: check_key("\ud800"), "surrogate"),
        (lambda: check_headers({"a": "\x00"}), "NUL"),
        (lambda: encode_payload({"a": "x\x00"}), "u0000"),
        (lambda: encode_payload(_nested(300)), "nested"),
    ],
)
def test_the_sdk_refuses_at_publish_what_the_cloud_would_refuse(
    call: object, fragment: str
) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        call()  # type: ignore[operator]


def _nested(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth - 1):
        value = [value]
    return value


STORABLE = st.builds(
    Record,
    st.integers(MIN_TS_US, MAX_TS_US),
    st.just(CT_JSON),
    JSON_VALUES.map(msgspec.json.encode),
    st.one_of(st.none(), st.text(st.characters(codec="ascii", exclude_characters="\x00"),
                                 max_size=10)),
) | st.builds(Record, st.integers(MIN_TS_US, MAX_TS_US), st.just(CT_RAW),
              st.binary(max_size=20))
ANY_RECORD = st.builds(
    Record,
    st.one_of(st.sampled_from([MIN_TS_US - 1, MAX_TS_US + 1, -(2**63), 2**64 - 1, True]),
              st.floats(-10.0, 10.0)),
    st.sampled_from([CT_RAW, CT_JSON, 2, 1.0]),
    st.one_of(st.binary(max_size=20), JSON_PIECES),
    st.one_of(st.none(), st.text(max_size=10), st.just("a\x00"), st.just("k" * 1025),
              st.just("\ud800")),
    st.one_of(st.none(), st.just({}), st.dictionaries(st.text(max_size=5),
                                                      st.text(max_size=5), max_size=2)),
)


@given(st.lists(STORABLE, max_size=20), st.lists(st.tuples(st.integers(0, 20), ANY_RECORD),
                                                  max_size=2))
@settings(max_examples=500)
def test_checking_a_list_says_what_checking_each_record_says(
        good: list[Record], bad: list[tuple[int, Record]]) -> None:
    """Whole columns at once (``record_problems``' quick way) or record by record, the
    reasons are the ones ``record_problem`` gives each record, at its index."""
    records = list(good)
    for where, rec in bad:
        records.insert(min(where, len(records)), rec)
    assert record_problems(records) == [
        (i, p) for i, r in enumerate(records) if (p := record_problem(r)) is not None]


def test_common_records_are_checked_by_whole_columns() -> None:
    """Telemetry with keys (or none), and opaque payloads, pass the column check; each kind
    of doubt sends the list to the per-record check."""
    common = [Record(1_700_000_000_000_000 + i, CT_JSON, b'{"t": %d}' % i, f"dev-{i % 7}")
              for i in range(100)] + [Record(0, CT_RAW, b"\x00", None)]
    assert _all_plainly_storable(common)
    for doubtful in (Record(0, CT_RAW, b"", "é"), Record(0, CT_RAW, b"", None, {}),
                     Record(MAX_TS_US + 1, CT_RAW, b""), Record(0, 2, b""),
                     Record(0, CT_JSON, b"{"), Record(0, CT_RAW, b"", "a\x00")):
        assert not _all_plainly_storable([*common, doubtful])
        assert record_problems([*common, doubtful]) == [
            (101, p) for p in [record_problem(doubtful)] if p is not None]


def _in_common_form(rec: Record) -> bool:
    """What every record of a batch must be for its decoder to check them all
    (``DecodedBatch.plain``)."""
    return (type(rec.ts) is int and MIN_TS_US <= rec.ts <= MAX_TS_US
            and type(rec.ct) is int and rec.ct in (CT_RAW, CT_JSON) and rec.headers is None
            and (rec.key is None or (type(rec.key) is str and len(rec.key) <= MAX_KEY_CHARS)))


COMMON_FORM = st.builds(
    Record,
    st.integers(MIN_TS_US, MAX_TS_US),
    st.sampled_from([CT_RAW, CT_JSON]),
    st.one_of(st.binary(max_size=20), JSON_PIECES, JSON_VALUES.map(msgspec.json.encode)),
    st.one_of(st.none(), st.text(max_size=10), st.just("a\x00"), st.just("k" * 1024)),
)
"""Records the common-form decoder takes, storable or not (keys' characters, payloads)."""


@given(st.lists(STORABLE | COMMON_FORM | ANY_RECORD, min_size=1, max_size=20))
@settings(max_examples=500)
def test_a_batch_in_the_common_form_is_checked_by_its_decoder_with_the_same_answers(
        records: list[Record]) -> None:
    """The ingest decodes a batch's records in the common form first (the decoder checks
    event times, content types, key lengths, no headers) and then skips those checks:
    it says so only when every record is in that form, the records are the ones sent,
    and the reasons are exactly what the full check gives."""
    try:
        body, headers = encode_batch(Batch(WIRE_VERSION, "e", "s", 1, 1, records))
    except (msgspec.EncodeError, UnicodeEncodeError):
        assume(False)  # not encodable (a lone surrogate in a key), so never on the wire
    decoded = decode_records(body, headers)
    assert decoded.plain == all(map(_in_common_form, records))
    if decoded.plain:
        assert decoded.records == records and not decoded.problems
        assert [hash(r) for r in decoded.records] == [hash(r) for r in records]
    present = [r for r in decoded.records if r is not None]
    assert record_problems(present, plain=decoded.plain) == record_problems(present)
    assert record_problems(present, plain=decoded.plain, json_syntax=False) == (
        record_problems(present, json_syntax=False))
