"""Turning what an application hands to ``publish`` into a record on its way, cheaply.

This is the per-record half of the SDK's hot path: validate, encode the payload
once, stamp the event time, and size the record for batching. It is pure (it
reads only its arguments), so the synchronous client calls it from application
threads. The rules are those of :mod:`broker.protocol.ingress` (the same
helpers decide every uncommon case); only the common case (a ``dict`` or
``bytes`` payload, no or a plain ASCII key, no headers) is handled inline,
because a profile of the edge path showed the general helpers' type dispatch
costing about as much as the JSON encoding itself.

A record travels as a plain tuple ``(ts_us, ct, payload, key, headers)``:
MessagePack writes it exactly as it writes a :class:`~broker.protocol.wire.Record`
(an array of five), at less than half the cost of building the struct.
:func:`encode_request` writes the request body the bridge decodes as an
:class:`~broker.protocol.ingress.IngressRequest`.
"""

from __future__ import annotations

import time
from typing import Final

import msgspec

from broker.errors import RecordTooLarge
from broker.protocol.ingress import (
    check_encoded_json,
    check_headers,
    check_key,
    encode_payload,
    to_ts_us,
)
from broker.protocol.tokens import validate_token
from broker.protocol.wire import CT_JSON, CT_RAW, MAX_KEY_CHARS
from edge_bridge.sdk._defaults import WIRE_RECORD_OVERHEAD_BYTES

__all__ = [
    "JSON_CHECK_ABOVE",
    "OutRecord",
    "Preparer",
    "encode_request",
    "plain_json",
    "prepare_record",
]

OutRecord = tuple[int, int, bytes, str | None, dict[str, str] | None]
"""``(ts_us, ct, payload, key, headers)``: a record as the SDK holds and sends it."""


class _Request(msgspec.Struct):
    """Encodes as :class:`~broker.protocol.ingress.IngressRequest` (same fields, same
    order); typed for tuples, which the SDK holds instead of ``Record`` structs."""

    producer: str
    request_seq: int
    records: list[OutRecord]


_json_encode: Final = msgspec.json.Encoder().encode
_msgpack_encode: Final = msgspec.msgpack.Encoder().encode
_now_ns: Final = time.time_ns
_KNOWN_STREAMS_MAX: Final = 10_000
"""Validated stream names remembered to skip the regex; bounded like all caches."""
JSON_CHECK_ABOVE: Final = 256
"""Bodies longer than this get the nesting check of ``check_encoded_json`` (a body of
at most this many bytes cannot nest deeper than ``MAX_JSON_DEPTH``, which it equals)."""


def plain_json(payload: object, key: object, max_bytes: int) -> bytes | None:
    """The JSON of the common record, or None: then :func:`prepare_record` decides.

    The common record is a ``dict`` payload whose JSON is at most ``max_bytes``
    long (at most :data:`JSON_CHECK_ABOVE`: too short to nest too deep) and holds
    no ``\\u0000``, with no key or a plain one (ASCII, no NUL, not too long); the
    caller checks that it has no ``ts`` and no headers. Its rules are
    :func:`prepare_record`'s, without the general helpers' type dispatch.
    """
    if type(payload) is not dict or not (key is None or (
            type(key) is str and len(key) <= MAX_KEY_CHARS and key.isascii()
            and "\x00" not in key)):
        return None
    try:
        data = _json_encode(payload)
    except Exception:  # prepare_record raises the InvalidInput that explains it
        return None
    # 92 is the backslash: a one-byte search (memchr) is ~10x cheaper than
    # looking for the six-byte escape, and JSON without one cannot hold it.
    if len(data) <= max_bytes and (92 not in data or b"\\u0000" not in data):
        return data
    return None


def prepare_record(
    payload: object, key: object, ts: object, headers: object, max_record_bytes: int
) -> tuple[OutRecord, int]:
    """Validate and convert one record; returns it with its batch-size charge.

    Raises:
        InvalidInput: bad key, headers, ts or payload type.
        RecordTooLarge: the payload exceeds ``max_record_bytes``.
    """
    kind = type(payload)
    if kind is dict:
        try:
            data = _json_encode(payload)
        except Exception:  # the general helper raises the InvalidInput that explains it
            ct, data = encode_payload(payload)
        else:
            ct = CT_JSON
            if len(data) > JSON_CHECK_ABOVE or (92 in data and b"\\u0000" in data):
                check_encoded_json(data)
    elif kind is bytes:
        ct, data = CT_RAW, payload  # type: ignore[assignment]  # narrowed by the type check
    else:
        ct, data = encode_payload(payload)
    nbytes = len(data)
    if nbytes > max_record_bytes:
        raise RecordTooLarge(
            f"payload of {nbytes} bytes exceeds max_record_bytes={max_record_bytes}")
    nbytes += WIRE_RECORD_OVERHEAD_BYTES
    ts_us = _now_ns() // 1000 if ts is None else to_ts_us(ts)
    if key is not None:
        # The common key (short ASCII text without NUL) needs none of check_key's work.
        if not (type(key) is str and len(key) <= MAX_KEY_CHARS and key.isascii()
                and "\x00" not in key):
            key = check_key(key)
        nbytes += len(key)  # type: ignore[arg-type]  # a str once checked
    if headers is not None:
        headers = check_headers(headers)
        assert headers is not None
        nbytes += sum(len(name) + len(value) + 2 for name, value in headers.items())
    return (ts_us, ct, data, key, headers), nbytes


def encode_request(producer: str, request_seq: int, records: list[OutRecord]) -> bytes:
    """The MessagePack body of one ingress request (an ``IngressRequest`` to the bridge)."""
    return _msgpack_encode(_Request(producer, request_seq, records))


class Preparer:
    """Validates and converts one client's records: the stream name (once per name),
    then :func:`plain_json` for the common record, :func:`prepare_record` for the rest.

    Pure but for the set of known stream names (a cache), so the synchronous
    client calls it from application threads.
    """

    __slots__ = ("_max_record_bytes", "inline_max_bytes", "known_streams")

    def __init__(self, max_record_bytes: int) -> None:
        self._max_record_bytes = max_record_bytes
        self.inline_max_bytes = min(max_record_bytes, JSON_CHECK_ABOVE)
        """Records larger than this take prepare_record's full path (the size limit,
        and the nesting check for longer JSON)."""
        self.known_streams: set[str] = set()
        """Stream names validated already (a bounded cache; the synchronous client's
        ``send`` reads it to take the common record's way without a call here)."""

    def prepare(self, stream: str, payload: object, key: object, ts: object,
                headers: object) -> tuple[OutRecord, int]:
        """Validate and convert one record; returns it with its batch-size charge.

        Raises:
            InvalidInput: bad stream name, key, headers, ts or payload type.
            RecordTooLarge: the payload exceeds ``max_record_bytes``.
        """
        if type(stream) is not str or stream not in self.known_streams:
            validate_token("stream name", stream)
            if len(self.known_streams) < _KNOWN_STREAMS_MAX:
                self.known_streams.add(stream)
        if ts is None and headers is None and (
                data := plain_json(payload, key, self.inline_max_bytes)) is not None:
            overhead = WIRE_RECORD_OVERHEAD_BYTES
            return ((_now_ns() // 1000, CT_JSON, data, key, None),  # type: ignore[return-value]
                    len(data) + (overhead if key is None else overhead + len(key)))  # type: ignore[arg-type]
        return prepare_record(payload, key, ts, headers, self._max_record_bytes)
