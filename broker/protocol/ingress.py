"""The SDK <-> bridge ingress protocol: request and response shapes, and record conversion.

This module is the single definition of the ingress wire shapes; both the SDK
(which encodes :class:`IngressRequest`) and the bridge's ingress (which decodes
it) import it. It therefore depends on nothing but msgspec,
:mod:`broker.protocol.wire` and :mod:`broker.protocol.validation`, so importing
it is cheap on both sides.

::

    POST {base_url}/v1/streams/{stream}/records
    Content-Type: application/msgpack
    {"producer": str, "request_seq": int, "records": [[ts_us, ct, payload, key, headers], ...]}

    200 {"epoch": int, "first_seq": int, "count": int, "duplicate": bool}
    4xx {"error": "<code>", "message": "..."}           permanent
    503 + Retry-After                                    buffer full: retry later

The conversion helpers turn what an application hands to ``publish`` into the
fields of a :class:`broker.protocol.wire.Record`, raising
:class:`~broker.errors.InvalidInput` with a reason for anything the bridge
would reject, so a bad record fails alone at ``publish`` instead of poisoning
the whole batch it would have travelled in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Final

import msgspec

from broker.errors import InvalidInput
from broker.protocol.validation import (
    MAX_JSON_DEPTH,
    headers_problem,
    json_problem,
    key_problem,
)
from broker.protocol.wire import CT_JSON, CT_RAW, MAX_TS_US, MIN_TS_US, Record

__all__ = [
    "CONTENT_TYPE",
    "MAX_PRODUCER_CHARS",
    "ErrorResponse",
    "IngressRequest",
    "IngressResponse",
    "ProducerId",
    "RequestSeq",
    "check_encoded_json",
    "check_headers",
    "check_key",
    "encode_payload",
    "records_path",
    "to_ts_us",
]

CONTENT_TYPE: Final = "application/msgpack"
"""The only request content type the ingress accepts (415 otherwise)."""
MAX_PRODUCER_CHARS: Final = 128

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US: Final = timedelta(microseconds=1)
_JSON_FAILURES: Final = (
    TypeError,  # unsupported type, non-string dict key
    ValueError,  # includes UnicodeEncodeError for lone surrogates
    OverflowError,
    RecursionError,  # self-referencing containers
    msgspec.EncodeError,
)

ProducerId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PRODUCER_CHARS)]
RequestSeq = Annotated[int, msgspec.Meta(ge=0, le=_INT64_MAX)]


class IngressRequest(msgspec.Struct, frozen=True):
    """The body of one ingress request: one producer's batch for one stream.

    ``(producer, request_seq)`` identifies the request: the bridge stores it at
    most once and answers a repeat with the original acknowledgement, which is
    what makes SDK retries safe. The constraints on the first two fields are
    checked when the bridge decodes the body.
    """

    producer: ProducerId
    request_seq: RequestSeq
    records: list[Record]


class IngressResponse(msgspec.Struct, frozen=True):
    """The 200 answer: the request's records are durable in the bridge buffer.

    Record ``i`` of the request got ``seq = first_seq + i`` in ``epoch``.
    ``duplicate`` is true when the bridge had already stored this request and
    is repeating its original answer.
    """

    epoch: int
    first_seq: int
    count: int
    duplicate: bool = False


class ErrorResponse(msgspec.Struct, frozen=True):
    """The body of every 4xx/5xx answer the ingress produces itself."""

    error: str
    """A stable machine-readable code, e.g. ``record_too_large``."""
    message: str
    """What was wrong, for a human."""


def records_path(stream: str) -> str:
    """The ingress path for ``stream`` (a validated token: nothing to escape)."""
    return f"/v1/streams/{stream}/records"


def encode_payload(payload: object) -> tuple[int, bytes]:
    """Turn an application payload into ``(content type, bytes)``.

    ``bytes``, ``bytearray`` and ``memoryview`` travel as-is (:data:`CT_RAW`);
    mutable buffers are copied, because the record is sent later. Anything else
    is encoded as JSON (:data:`CT_JSON`): dicts, lists, strings, numbers,
    booleans and ``None``, and whatever else msgspec encodes as JSON
    (datetimes as ISO strings, dataclasses and msgspec Structs as objects).
    Non-finite floats become ``null``: JSON, and Postgres ``jsonb``, have no NaN.

    Raises:
        InvalidInput: the payload is not bytes and cannot be encoded as JSON.
    """
    if type(payload) is dict:  # the common case first: straight to JSON
        pass
    elif isinstance(payload, bytes):
        return CT_RAW, payload
    elif isinstance(payload, bytearray | memoryview):
        try:
            return CT_RAW, bytes(payload)
        except (TypeError, ValueError, BufferError) as exc:  # released or odd memoryview
            raise InvalidInput(f"payload buffer cannot be read: {exc}") from exc
    try:
        body = msgspec.json.encode(payload)
    except _JSON_FAILURES as exc:
        raise InvalidInput(
            f"payload of type {type(payload).__name__} is neither bytes nor JSON-encodable: {exc}"
        ) from exc
    check_encoded_json(body)
    return CT_JSON, body


def check_encoded_json(body: bytes) -> None:
    """Check JSON text msgspec encoded for what PostgreSQL ``jsonb`` may still refuse.

    msgspec's output is valid JSON; a NUL character or nesting beyond
    ``MAX_JSON_DEPTH`` are what is left, and both are cheap to rule out (a body
    of at most ``MAX_JSON_DEPTH`` bytes cannot nest deeper than that).

    Raises:
        InvalidInput: ``jsonb`` would refuse the text.
    """
    if b"\\u0000" in body or (
        len(body) > MAX_JSON_DEPTH and body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH
    ):
        problem = json_problem(body)
        if problem:
            raise InvalidInput(f"payload: {problem}")


def to_ts_us(ts: object) -> int:
    """Turn an event time into integer microseconds since the Unix epoch (UTC).

    Accepts an aware ``datetime`` (any zone), a naive ``datetime`` (taken as
    UTC), ``int``/``float`` seconds since the epoch, or ``None`` for now.

    Raises:
        InvalidInput: any other type (including ``bool`` and plain ``date``),
            a non-finite float, or a time outside 0001-01-01..9999-12-31 UTC
            (what the cloud stores; :mod:`broker.protocol.validation`).
    """
    if ts is None:
        return time.time_ns() // 1000
    if isinstance(ts, datetime):
        aware = ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
        # timedelta arithmetic is exact, unlike datetime.timestamp() * 1e6.
        us = (aware - _EPOCH) // _ONE_US
    elif isinstance(ts, bool):
        # bool is an int subclass; ts=True is a bug, not 1970-01-01T00:00:01.
        raise InvalidInput("ts must be a datetime, seconds since the epoch or None, not bool")
    elif isinstance(ts, int):
        us = ts * 1_000_000
    elif isinstance(ts, float):
        if not math.isfinite(ts):
            raise InvalidInput(f"ts must be a finite number of seconds, not {ts!r}")
        us = round(ts * 1_000_000)
    else:
        raise InvalidInput(
            f"ts must be a datetime, seconds since the epoch (int/float) or None, "
            f"not {type(ts).__name__}"
        )
    if not MIN_TS_US <= us <= MAX_TS_US:
        raise InvalidInput(f"ts {ts!r} is outside the storable range 0001-01-01..9999-12-31 UTC")
    return us


def check_key(key: object) -> str | None:
    """Return ``key`` if it is ``None`` or a string of at most the wire's key length.

    Raises:
        InvalidInput: a non-string key, or one longer than the wire allows.
    """
    if key is None:
        return None
    if not isinstance(key, str):
        raise InvalidInput(f"key must be a str or None, not {type(key).__name__}")
    problem = key_problem(key)
    if problem:
        raise InvalidInput(problem)
    return key


def check_headers(headers: object) -> dict[str, str] | None:
    """Return a private ``dict`` copy of ``headers`` if it maps strings to strings.

    The copy matters because the record is encoded later, in a batch: an
    application reusing its dict must not change a record already published.

    Raises:
        InvalidInput: not a mapping of ``str`` to ``str``.
    """
    if headers is None:
        return None
    if not isinstance(headers, Mapping):
        raise InvalidInput(
            f"headers must be a dict[str, str] or None, not {type(headers).__name__}"
        )
    copy: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidInput(
                f"headers must map str to str; got {type(name).__name__} -> "
                f"{type(value).__name__} for {name!r}"
            )
        copy[name] = value
    problem = headers_problem(copy)
    if problem:
        raise InvalidInput(problem)
    return copy
