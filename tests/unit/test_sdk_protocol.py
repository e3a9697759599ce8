"""The SDK's ingress protocol module: record conversion, validation, and the body's shape."""

from __future__ import annotations

import math
import time
from datetime import UTC, date, datetime, timedelta, timezone

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import InvalidInput
from broker.protocol.ingress import (
    IngressRequest,
    IngressResponse,
    check_headers,
    check_key,
    encode_payload,
    records_path,
    to_ts_us,
)
from broker.protocol.wire import CT_JSON, CT_RAW, Record

# -- payloads -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload", [b"\x00\xffraw", bytearray(b"\x00\xffraw"), memoryview(b"\x00\xffraw")]
)
def test_bytes_like_payloads_travel_raw_and_unchanged(
    payload: bytes | bytearray | memoryview,
) -> None:
    """bytes, bytearray and memoryview become CT_RAW with exactly their bytes."""
    ct, data = encode_payload(payload)
    assert ct == CT_RAW
    assert type(data) is bytes
    assert data == b"\x00\xffraw"


def test_a_mutable_buffer_is_copied_so_later_changes_do_not_leak_into_the_record() -> None:
    """The record is sent later, so a bytearray reused by the application must not alias it."""
    buf = bytearray(b"abc")
    _, data = encode_payload(buf)
    buf[0] = ord("z")
    assert data == b"abc"


@pytest.mark.parametrize(
    "payload",
    [{"a": 1, "b": [1.5, "x", None, True]}, [1, 2, 3], "text", 42, 2.5, True, False, None],
)
def test_json_values_become_utf8_json_text(payload: object) -> None:
    """dict, list, str, int, float, bool and None are sent as CT_JSON and round-trip."""
    ct, data = encode_payload(payload)
    assert ct == CT_JSON
    assert msgspec.json.decode(data) == payload
    data.decode("utf-8")  # valid UTF-8, as CT_JSON promises


def test_non_ascii_json_is_utf8() -> None:
    """Non-ASCII text is encoded as UTF-8, not mangled."""
    _, data = encode_payload({"city": "Zürich"})
    assert "Zürich" in data.decode("utf-8")


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (object(), "object"),
        ({1j: "x"}, "dict"),
        ({"k": object}, "type"),
        ("lone \udc80 surrogate", "str"),
    ],
)
def test_a_payload_that_is_neither_bytes_nor_json_fails_with_a_clear_invalid_input(
    payload: object, fragment: str
) -> None:
    """InvalidInput names the payload's type and says what was expected."""
    with pytest.raises(InvalidInput, match="neither bytes nor JSON-encodable") as info:
        encode_payload(payload)
    assert fragment in str(info.value)


def test_a_self_referencing_payload_fails_with_invalid_input() -> None:
    """A cycle is an InvalidInput, not a RecursionError escaping to the caller."""
    cyclic: list[object] = []
    cyclic.append(cyclic)
    with pytest.raises(InvalidInput):
        encode_payload(cyclic)


# -- timestamps ---------------------------------------------------------------------------


def test_an_aware_datetime_becomes_exact_microseconds_since_the_epoch() -> None:
    """Any zone is converted exactly, with no float rounding."""
    plus2 = timezone(timedelta(hours=2))
    ts = datetime(2024, 5, 1, 14, 0, 0, 123456, tzinfo=plus2)
    assert to_ts_us(ts) == 1714564800_123456


def test_a_naive_datetime_is_taken_as_utc() -> None:
    """A naive datetime means UTC, never the machine's local zone."""
    naive = datetime(2024, 5, 1, 12, 0, 0, 1)
    assert to_ts_us(naive) == to_ts_us(naive.replace(tzinfo=UTC)) == 1714564800_000001


def test_numbers_are_seconds_since_the_epoch() -> None:
    """int and float are seconds; floats keep microsecond precision."""
    assert to_ts_us(0) == 0
    assert to_ts_us(1714564800) == 1714564800_000000
    assert to_ts_us(1714564800.25) == 1714564800_250000
    assert to_ts_us(-1.5) == -1_500_000


def test_none_is_now() -> None:
    """ts=None stamps the current time."""
    before = time.time_ns() // 1000
    ts = to_ts_us(None)
    after = time.time_ns() // 1000
    assert before <= ts <= after


@pytest.mark.parametrize(
    ("ts", "fragment"),
    [
        (True, "not bool"),
        ("2024-05-01", "not str"),
        (date(2024, 5, 1), "not date"),
        (math.nan, "finite"),
        (math.inf, "finite"),
        (10**20, "range"),
    ],
)
def test_a_bad_timestamp_fails_with_a_clear_invalid_input(ts: object, fragment: str) -> None:
    """Wrong types, non-finite floats and out-of-range times are rejected with a reason."""
    with pytest.raises(InvalidInput, match=fragment):
        to_ts_us(ts)


@given(st.datetimes(timezones=st.just(UTC)))
def test_datetime_conversion_agrees_with_timedelta_arithmetic(ts: datetime) -> None:
    """For every datetime, the result counts the microseconds since 1970-01-01 UTC."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert to_ts_us(ts) == (ts - epoch) // timedelta(microseconds=1)


# -- key and headers ----------------------------------------------------------------------


def test_a_key_is_a_string_or_none() -> None:
    """Strings and None pass; other types and over-long keys are rejected."""
    assert check_key(None) is None
    assert check_key("sensor-7") == "sensor-7"
    with pytest.raises(InvalidInput, match="key must be a str or None, not int"):
        check_key(7)
    with pytest.raises(InvalidInput, match="exceeds 1024"):
        check_key("k" * 1025)


def test_headers_are_copied_and_must_map_strings_to_strings() -> None:
    """A valid mapping is copied (so later edits do not leak); anything else is rejected."""
    original = {"source": "plc-1"}
    copy = check_headers(original)
    original["source"] = "changed"
    assert copy == {"source": "plc-1"}
    assert check_headers(None) is None
    with pytest.raises(InvalidInput, match="str to str"):
        check_headers({"n": 1})
    with pytest.raises(InvalidInput, match="not list"):
        check_headers([("a", "b")])


# -- the request body ---------------------------------------------------------------------


def test_ingress_request_encodes_to_the_documented_map() -> None:
    """The body is {"producer", "request_seq", "records"} with each record a 5-element array."""
    request = IngressRequest(
        producer="p-1",
        request_seq=9,
        records=[
            Record(1_000_000, CT_JSON, b'{"a":1}', "k", {"h": "v"}),
            Record(2_000_000, CT_RAW, b"\x00", None, None),
        ],
    )
    body = msgspec.msgpack.decode(msgspec.msgpack.encode(request))
    assert body == {
        "producer": "p-1",
        "request_seq": 9,
        "records": [
            [1_000_000, CT_JSON, b'{"a":1}', "k", {"h": "v"}],
            [2_000_000, CT_RAW, b"\x00", None, None],
        ],
    }


def test_ingress_request_decoding_enforces_the_documented_limits() -> None:
    """The bridge's decode rejects an empty or over-long producer and a negative request_seq."""
    decoder = msgspec.msgpack.Decoder(IngressRequest)
    ok = {"producer": "p", "request_seq": 0, "records": []}
    assert decoder.decode(msgspec.msgpack.encode(ok)).producer == "p"
    for bad in ({"producer": ""}, {"producer": "p" * 129}, {"request_seq": -1}):
        with pytest.raises(msgspec.ValidationError):
            decoder.decode(msgspec.msgpack.encode({**ok, **bad}))


def test_ingress_response_decodes_the_documented_json() -> None:
    """The 200 body decodes into epoch, first_seq, count and duplicate."""
    body = b'{"epoch": 5, "first_seq": 10, "count": 3, "duplicate": true}'
    ack = msgspec.json.decode(body, type=IngressResponse)
    assert (ack.epoch, ack.first_seq, ack.count, ack.duplicate) == (5, 10, 3, True)


def test_records_path_puts_the_stream_in_the_url() -> None:
    """The ingress endpoint is /v1/streams/{stream}/records."""
    assert records_path("telemetry") == "/v1/streams/telemetry/records"
