"""The bridge's local HTTP ingress: where SDKs (or curl) hand over records.

``POST /v1/streams/{stream}/records`` answers only once the records are durable
in the buffer. MessagePack is the SDK's format; JSON is accepted for any
language and for curl. Every refusal is a 4xx/503 with a JSON body
``{"error": code, "message": text}``; the protocol is documented in
``docs/ingress-http.md``.
"""

from __future__ import annotations

import base64
import binascii
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from broker.errors import BufferFull, ClosedError, InvalidInput, RecordTooLarge
from broker.protocol.ingress import IngressRequest
from broker.protocol.tokens import TOKEN_PATTERN, is_valid_token
from broker.protocol.wire import CT_JSON, CT_RAW, Record

if TYPE_CHECKING:
    from edge_bridge.bridge import Bridge

__all__ = ["MSGPACK_TYPES", "create_app"]

log = structlog.get_logger(__name__)

MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")


class _JsonRecord(msgspec.Struct, forbid_unknown_fields=True):
    payload: Any = msgspec.UNSET
    payload_b64: str | None = None
    key: str | None = None
    ts: float | str | None = None
    headers: dict[str, str] | None = None


class _JsonRequest(msgspec.Struct, forbid_unknown_fields=True):
    records: list[_JsonRecord]
    producer: str | None = None
    request_seq: int | None = None


_msgpack_request = msgspec.msgpack.Decoder(IngressRequest)
_json_request = msgspec.json.Decoder(_JsonRequest)
_json_encoder = msgspec.json.Encoder()


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None
           ) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


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
        return int(parsed.timestamp() * 1_000_000)
    return int(value * 1_000_000)


def _from_json(req: _JsonRequest) -> list[Record]:
    now_us = int(time.time() * 1_000_000)
    out: list[Record] = []
    for i, rec in enumerate(req.records):
        if rec.payload_b64 is not None:
            if rec.payload is not msgspec.UNSET:
                raise InvalidInput(f"record {i}: give either payload or payload_b64, not both")
            try:
                body = base64.b64decode(rec.payload_b64, validate=True)
            except binascii.Error as exc:
                raise InvalidInput(f"record {i}: payload_b64 is not base64: {exc}") from exc
            ct = CT_RAW
        elif rec.payload is msgspec.UNSET:
            raise InvalidInput(f"record {i}: missing payload")
        else:
            body = _json_encoder.encode(rec.payload)
            ct = CT_JSON
        out.append(Record(_json_ts(rec.ts, now_us), ct, body, rec.key, rec.headers))
    return out


def create_app(bridge: Bridge) -> FastAPI:
    """The ingress application of one bridge."""
    app = FastAPI(
        title="edgesync edge bridge",
        version=bridge.version,
        description="Local ingress of an edgesync edge bridge. See docs/ingress-http.md.",
    )
    settings = bridge.settings
    metrics = bridge.metrics

    @app.post("/v1/streams/{stream}/records")
    async def post_records(stream: str, request: Request) -> Response:
        response = await _handle(stream, request)
        metrics.ingress_requests.labels(str(response.status_code)).inc()
        return response

    async def _handle(stream: str, request: Request) -> Response:
        started = time.perf_counter()
        if not is_valid_token(stream):
            return _error(400, "invalid_stream",
                          f"stream name {stream!r} must match {TOKEN_PATTERN}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > (
            settings.max_request_bytes
        ):
            return _error(413, "request_too_large",
                          f"body of {declared} bytes exceeds {settings.max_request_bytes}")
        body = await request.body()
        if len(body) > settings.max_request_bytes:
            return _error(413, "request_too_large",
                          f"body of {len(body)} bytes exceeds {settings.max_request_bytes}")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        producer: str | None
        request_seq: int | None
        try:
            if ctype in MSGPACK_TYPES:
                req = _msgpack_request.decode(body)
                records, producer, request_seq = req.records, req.producer, req.request_seq
            elif ctype == "application/json":
                jreq = _json_request.decode(body)
                records = _from_json(jreq)
                producer, request_seq = jreq.producer, jreq.request_seq
            else:
                return _error(415, "unsupported_media_type",
                              f"content-type {ctype!r}: use application/msgpack or "
                              "application/json")
            _validate(records, producer, request_seq, settings.max_record_bytes)
        except RecordTooLarge as exc:
            return _error(413, "record_too_large", str(exc))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return _error(422, "malformed_body", f"malformed body: {exc}")
        except InvalidInput as exc:
            return _error(422, "invalid_records", str(exc))
        try:
            result = await bridge.buffer.append(
                stream, records, producer=producer, request_seq=request_seq
            )
        except BufferFull as exc:
            return _error(503, "buffer_full", str(exc),
                          headers={"Retry-After": str(max(1, round(exc.retry_after)))})
        except InvalidInput as exc:
            return _error(413, "request_too_large", str(exc))
        except ClosedError as exc:
            return _error(503, "shutting_down", str(exc), headers={"Retry-After": "1"})
        if result.duplicate:
            metrics.duplicate_requests.inc()
        else:
            metrics.records_accepted.labels(stream).inc(result.count)
        metrics.append_seconds.observe(time.perf_counter() - started)
        return JSONResponse({
            "epoch": result.epoch,
            "first_seq": result.first_seq,
            "count": result.count,
            "duplicate": result.duplicate,
        })

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        # Ready means "accepting records durably"; NATS being down is not a reason
        # to refuse them (buffering through outages is the bridge's job).
        body = {"ready": bridge.accepting, "nats_connected": bridge.nats_connected}
        return JSONResponse(body, status_code=200 if bridge.accepting else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        await bridge.refresh_gauges()
        return PlainTextResponse(generate_latest(metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    return app


def _validate(
    records: list[Record], producer: str | None, request_seq: int | None, max_record_bytes: int
) -> None:
    if not records:
        raise InvalidInput("records must not be empty")
    if (producer is None) != (request_seq is None):
        raise InvalidInput("producer and request_seq go together: give both or neither")
    if producer is not None and not 0 < len(producer) <= 128:
        raise InvalidInput("producer must be 1 to 128 characters")
    if request_seq is not None and request_seq < 0:
        raise InvalidInput("request_seq must be >= 0")
    for i, rec in enumerate(records):
        if len(rec.payload) > max_record_bytes:
            raise RecordTooLarge(
                f"record {i} payload is {len(rec.payload)} bytes; the limit is {max_record_bytes}"
            )
        if rec.ct not in (CT_RAW, CT_JSON):
            raise InvalidInput(f"record {i}: unknown content type {rec.ct}")
        if rec.key is not None and len(rec.key) > 1024:
            raise InvalidInput(f"record {i}: key longer than 1024 characters")
