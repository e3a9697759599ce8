"""The ingress's one write route, apart from any web framework: a records request in,
its answer out.

``POST /v1/streams/{stream}/records`` answers only once the records are durable
in the buffer. MessagePack is the SDK's format; JSON is accepted for any
language and for curl; either may be sent gzip-compressed
(``Content-Encoding: gzip``). Every refusal is an
:class:`~broker.errors.EdgesyncError` answered as a 4xx/503 with a JSON body
``{"error": code, "message": text}`` and the status of the one table,
:data:`broker.errors.HTTP_STATUS`; the protocol is documented in
``docs/ingress-http.md``.

A request is all or nothing: every record is checked by the cloud's own
validator (:mod:`broker.protocol.validation`) before any is stored, and a 422
lists each bad record's index and reason, so nothing acknowledged here can be
refused later by the ingest or PostgreSQL.

:class:`RecordsEndpoint` is called by both ways a request reaches it: the
application's route (:func:`edge_bridge.ingress.create_app`, which also describes it in
``/openapi.json``) and the ASGI fast path in front of that app
(:mod:`edge_bridge.ingress_fast_path`); both send the Starlette response it
returns, so their answers are the same by construction.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING

import msgspec
from starlette.responses import Response

from broker.errors import (
    EdgesyncError,
    InvalidEncoding,
    InvalidInput,
    InvalidName,
    InvalidRecords,
    RecordTooLarge,
    RequestTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from broker.protocol.ingress import IngressRequest, RequestSeq, to_ts_us
from broker.protocol.tokens import TOKEN_PATTERN, is_valid_token
from broker.protocol.validation import record_problems
from broker.protocol.wire import CT_JSON, CT_RAW, Record
from broker.serving import error_response
from edge_bridge.buffer.chunks import EncodedChunk, encode_chunks
from edge_bridge.ingress_bulk import plain_request

if TYPE_CHECKING:
    from edge_bridge.bridge import Bridge

__all__ = ["MSGPACK_TYPES", "RecordsEndpoint"]

MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="edgesync-ingress"'}


class _JsonRecord(msgspec.Struct, forbid_unknown_fields=True):
    payload: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    """Kept as the JSON text it arrived as: stored as such, never re-encoded."""
    payload_b64: str | None = None
    key: str | None = None
    ts: float | str | None = None
    headers: dict[str, str] | None = None


class _JsonRequest(msgspec.Struct, forbid_unknown_fields=True):
    records: list[_JsonRecord]
    producer: str | None = None
    request_seq: RequestSeq | None = None


_msgpack_request = msgspec.msgpack.Decoder(IngressRequest)
_json_request = msgspec.json.Decoder(_JsonRequest)
_json_encode = msgspec.json.Encoder().encode


class RecordsEndpoint:
    """Answers records requests for one bridge: validate, append durably, acknowledge."""

    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge
        self._settings = bridge.settings
        self._metrics = bridge.metrics

    async def respond(self, stream: str, headers: Mapping[str, str],
                      body: AsyncIterator[bytes]) -> Response:
        """The answer to one request (its status counted in the metrics).

        Args:
            stream: the path's stream name, as routed (not yet checked).
            headers: the request's headers by lower-case name (the first of repeats).
            body: the request body's chunks as they arrive; read only once the
                headers passed (an unknown producer never gets its body read).
        """
        try:
            response = await self._handle(stream, headers, body)
        except RecursionError:  # a body nested beyond what any decoder here recurses into
            response = error_response(
                InvalidInput("body nested too deeply to decode", code="malformed_body"))
        self._metrics.ingress_requests.labels(str(response.status_code)).inc()
        return response

    async def _handle(self, stream: str, headers: Mapping[str, str],
                      body: AsyncIterator[bytes]) -> Response:
        started = time.perf_counter()
        try:
            chunks, producer, request_seq = await self._read(stream, headers, body)
            try:
                result = await self._bridge.buffer.append(
                    stream, chunks, producer=producer, request_seq=request_seq
                )
            except InvalidInput as exc:  # the buffer refuses a request it cannot hold
                if exc.code != "invalid_input":
                    raise  # a refusal with its own name (too_many_streams)
                raise RequestTooLarge(str(exc)) from exc
        except EdgesyncError as exc:
            return error_response(exc, headers=_CHALLENGE if isinstance(exc, Unauthorized)
                                  else None)
        metrics = self._metrics
        if result.duplicate:
            metrics.duplicate_requests.inc()
        else:
            metrics.records_accepted.labels(stream).inc(result.count)
        metrics.append_seconds.observe(time.perf_counter() - started)
        # The bytes JSONResponse renders (compact, same key order), without the
        # standard library's encoder: one of the per-request costs in the profile.
        return Response(_json_encode({
            "epoch": result.epoch,
            # JSON numbers lose integers above 2^53 in JavaScript (and other doubles).
            "epoch_str": str(result.epoch),
            "first_seq": result.first_seq,
            "count": result.count,
            "duplicate": result.duplicate,
        }), media_type="application/json")

    async def _read(self, stream: str, headers: Mapping[str, str], chunks: AsyncIterator[bytes]
                    ) -> tuple[list[EncodedChunk], str | None, int | None]:
        """The request's records, validated and encoded into the buffer's chunks;
        refusals raise (statuses: ``HTTP_STATUS``)."""
        settings = self._settings
        if not is_valid_token(stream):
            raise InvalidName(f"stream name {stream!r} must match {TOKEN_PATTERN}",
                              code="invalid_stream")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > (
            settings.max_request_bytes
        ):
            raise RequestTooLarge(
                f"body of {declared} bytes exceeds {settings.max_request_bytes}")
        # From the headers alone: an unknown producer never gets its body read.
        self._bridge.producers.check(stream, headers.get("authorization"))
        body = await _bounded_body(chunks, settings.max_request_bytes)
        encoding = headers.get("content-encoding", "").strip().lower()
        body = _decoded_body(body, encoding, settings.max_request_bytes)
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        producer: str | None
        request_seq: int | None
        if ctype in MSGPACK_TYPES:
            # The common request, checked in bulk; anything else takes the general way.
            plain = plain_request(body, max_record_bytes=settings.max_record_bytes)
            if plain is not None:
                return plain.chunks, plain.producer, plain.request_seq
        try:
            if ctype in MSGPACK_TYPES:
                req = _msgpack_request.decode(body)
                records, producer, request_seq = req.records, req.producer, req.request_seq
            elif ctype == "application/json":
                jreq = _json_request.decode(body)
                records = _from_json(jreq)
                producer, request_seq = jreq.producer, jreq.request_seq
            else:
                raise UnsupportedMediaType(
                    f"content-type {ctype!r}: use application/msgpack or application/json")
            _validate(records, producer, request_seq, settings.max_record_bytes,
                      body_bytes=len(body))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise InvalidInput(f"malformed body: {exc}", code="malformed_body") from exc
        except InvalidInput as exc:
            if type(exc) is not InvalidInput:  # the subclasses carry their own code
                raise
            raise InvalidInput(str(exc), code="invalid_records") from exc
        return encode_chunks(records), producer, request_seq


def _json_ts(value: float | str | None, now_us: int) -> int:
    if value is None:
        return now_us
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise InvalidInput(f"ts {value!r} is not an ISO 8601 time or epoch seconds") from exc
        if parsed.tzinfo is None:
            raise InvalidInput(f"ts {value!r} has no time zone; add 'Z' or an offset")
        return to_ts_us(parsed)
    if not math.isfinite(value):
        raise InvalidInput(f"ts {value!r} is not a finite number of seconds")
    return round(value * 1_000_000)  # any size: the validator checks the range


def _from_json(req: _JsonRequest) -> list[Record]:
    now_us = time.time_ns() // 1000
    out: list[Record] = []
    for i, rec in enumerate(req.records):
        if rec.payload_b64 is not None:
            if rec.payload is not msgspec.UNSET:
                raise InvalidInput(f"record {i}: give either payload or payload_b64, not both")
            try:
                body = base64.b64decode(rec.payload_b64, validate=True)
            except (binascii.Error, ValueError) as exc:  # ValueError: not even ASCII
                raise InvalidInput(f"record {i}: payload_b64 is not base64: {exc}") from exc
            ct = CT_RAW
        elif isinstance(rec.payload, msgspec.Raw):
            body = bytes(rec.payload)
            ct = CT_JSON
        else:
            raise InvalidInput(f"record {i}: missing payload")
        try:
            ts = _json_ts(rec.ts, now_us)
        except InvalidInput as exc:
            raise InvalidInput(f"record {i}: {exc}") from exc
        out.append(Record(ts, ct, body, rec.key, rec.headers))
    return out


def _decoded_body(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """The request body without its ``Content-Encoding`` (gzip, bounded), or raise."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise UnsupportedMediaType(
            f"content-encoding {encoding!r}: send the body plain or gzip",
            code="unsupported_content_encoding")
    inflater = zlib.decompressobj(wbits=31)
    try:
        plain = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise InvalidEncoding(f"body is not valid gzip: {exc}") from exc
    if len(plain) > max_bytes:
        raise RequestTooLarge(f"gzip body expands past {max_bytes} bytes")
    if not inflater.eof:
        raise InvalidEncoding("gzip body is truncated")
    return plain


async def _bounded_body(chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """The body, read as it streams in and refused once past ``max_bytes`` (a chunked
    body has no Content-Length to refuse it by)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise RequestTooLarge(f"body exceeds {max_bytes} bytes")
        parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _validate(
    records: list[Record], producer: str | None, request_seq: int | None, max_record_bytes: int,
    *, body_bytes: int,
) -> None:
    if not records:
        raise InvalidInput("records must not be empty")
    if (producer is None) != (request_seq is None):
        raise InvalidInput("producer and request_seq go together: give both or neither")
    if producer is not None and not 0 < len(producer) <= 128:
        raise InvalidInput("producer must be 1 to 128 characters")
    # No payload is longer than the body it came in (MessagePack; JSON's base64 is longer
    # than the bytes it encodes): the common request needs no look at each record.
    for i, rec in enumerate(records if body_bytes > max_record_bytes else ()):
        if len(rec.payload) > max_record_bytes:
            raise RecordTooLarge(
                f"record {i} payload is {len(rec.payload)} bytes; the limit is {max_record_bytes}"
            )
    problems = record_problems(records)
    if problems:
        raise InvalidRecords(problems)
