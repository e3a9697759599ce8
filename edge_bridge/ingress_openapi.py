"""The ingress's OpenAPI document (``GET /openapi.json``): real bodies, every answer.

The bridge serves no web framework that could infer a description (the records
route reads its body itself: MessagePack or JSON, maybe gzip), so this module
writes the whole document by hand, so that a client generator or a test tool can
exercise the ingress from ``/openapi.json`` alone. It must say what
``docs/ingress-http.md`` says; ``tests/integration/test_ingress_validation.py``
checks the answers it lists against the real ones.
"""

from __future__ import annotations

from typing import Any, Final

from broker.protocol.validation import MAX_JSON_DEPTH
from broker.protocol.wire import MAX_TS_US, MIN_TS_US

__all__ = ["RECORDS_PATH", "RESPONSES", "STREAM_PARAMETER", "document", "request_body"]

_ERROR: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "Stable machine-readable code."},
        "message": {"type": "string", "description": "What was wrong, for a human."},
    },
}
_INT64: Final = {"type": "integer", "format": "int64"}

RECORDS_PATH: Final = "/v1/streams/{stream}/records"
"""The write route's path template (the application's route; the fast path matches the same)."""

STREAM_PARAMETER: Final[dict[str, Any]] = {
    "name": "stream", "in": "path", "required": True,
    "schema": {"type": "string", "title": "Stream"},
    "description": "The stream's name, [A-Za-z0-9_-]{1,64} (400 invalid_stream otherwise).",
}
"""The route's path parameter."""


def _error(description: str, codes: list[str], **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {**_ERROR, "properties": {
        **_ERROR["properties"], "error": {"type": "string", "enum": codes}, **extra}}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    200: {
        "description": "Durable in the bridge buffer. Record i got seq first_seq + i in epoch.",
        "content": {"application/json": {"schema": {
            "type": "object",
            "required": ["epoch", "epoch_str", "first_seq", "count", "duplicate"],
            "properties": {
                "epoch": {**_INT64, "description": "Random 63-bit id of the buffer's epoch."},
                "epoch_str": {"type": "string", "description": "The epoch in decimal: "
                              "JSON numbers above 2^53 are not exact in JavaScript."},
                "first_seq": _INT64,
                "count": {"type": "integer"},
                "duplicate": {"type": "boolean", "description": "A retry of a request already "
                              "stored: this is its original answer."},
            },
        }}},
    },
    400: _error("Bad stream name, or a body that is not valid gzip.",
                ["invalid_stream", "invalid_content_encoding"]),
    401: _error("Producer tokens are configured and none, or an unknown one, was given.",
                ["unauthorized"]),
    403: _error("The producer's token does not allow this stream.", ["forbidden"]),
    409: _error("(producer, request_seq) was already used for another request.",
                ["request_seq_reused"]),
    413: _error("Body, decompressed body or one record payload over its limit.",
                ["request_too_large", "record_too_large"]),
    415: _error("Content-Type or Content-Encoding not understood.",
                ["unsupported_media_type", "unsupported_content_encoding"]),
    422: _error(
        "Malformed body, or records the cloud could not store; nothing of the request was "
        "stored.", ["malformed_body", "invalid_records", "too_many_streams"],
        records={"type": "array", "description": "With invalid_records: each bad record.",
                 "items": {"type": "object", "required": ["index", "reason"], "properties": {
                     "index": {"type": "integer"}, "reason": {"type": "string"}}}}),
    503: _error("Buffer full (stream policy block) or shutting down: retry after "
                "Retry-After seconds.", ["buffer_full", "shutting_down"]),
}

_TS = (f"Event time. MessagePack: integer microseconds since the Unix epoch, "
       f"{MIN_TS_US}..{MAX_TS_US} (0001-01-01..9999-12-31 UTC); an integer, never a float.")


def request_body() -> dict[str, Any]:
    """The ``requestBody`` object of ``POST /v1/streams/{stream}/records``."""
    msgpack_record = {
        "type": "array", "minItems": 3, "maxItems": 5,
        "description": "[ts_us, ct, payload, key, headers]. ts_us: " + _TS + " ct: 0 = "
        "opaque bytes (bin), 1 = UTF-8 JSON text (bin). key: str or nil. headers: map "
        "str -> str or nil.",
    }
    json_record = {
        "type": "object", "additionalProperties": False,
        "properties": {
            "payload": {"description": f"Any JSON value (stored as jsonb; no \\u0000, nested "
                        f"at most {MAX_JSON_DEPTH} deep)."},
            "payload_b64": {"type": "string", "description": "Opaque bytes, base64 "
                            "(instead of payload)."},
            "key": {"type": ["string", "null"], "maxLength": 1024},
            "ts": {"type": ["number", "string", "null"], "description": "Seconds since the "
                   "epoch, or an ISO 8601 time with a zone; default: now. Within "
                   "0001-01-01..9999-12-31 UTC."},
            "headers": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
        },
    }
    envelope = {
        "producer": {"type": "string", "minLength": 1, "maxLength": 128,
                     "description": "Producer id; with request_seq makes retries safe."},
        "request_seq": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
    }
    return {
        "required": True,
        "description": "One request: a producer's records for this stream, stored all or "
        "nothing. May be sent with Content-Encoding: gzip.",
        "content": {
            "application/msgpack": {"schema": {
                "type": "object", "required": ["producer", "request_seq", "records"],
                "properties": {**envelope, "records": {"type": "array", "minItems": 1,
                                                       "items": msgpack_record}},
            }},
            "application/json": {"schema": {
                "type": "object", "required": ["records"], "additionalProperties": False,
                "properties": {**envelope, "records": {"type": "array", "minItems": 1,
                                                       "items": json_record}},
            }},
        },
    }


def _json_answer(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_READY: Final[dict[str, Any]] = {
    "type": "object", "required": ["ready", "nats_connected"],
    "properties": {
        "ready": {"type": "boolean", "description": "Accepting records durably."},
        "nats_connected": {"type": "boolean", "description": "Connected to NATS (not a "
                           "condition of readiness: the bridge buffers through outages)."},
    },
}


def document(version: str) -> dict[str, Any]:
    """The ingress's whole OpenAPI 3.1 document, for a bridge of ``version``."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "edgesync edge bridge", "version": version,
                 "description": "Local ingress of an edgesync edge bridge. "
                                "See docs/ingress-http.md."},
        "paths": {
            RECORDS_PATH: {"post": {
                "summary": "Post Records",
                "description": "Store records durably; the answer gives each its identity "
                               "(see docs/ingress-http.md).",
                "operationId": "post_records",
                "parameters": [STREAM_PARAMETER],
                "requestBody": request_body(),
                "responses": {str(status): answer for status, answer in RESPONSES.items()},
            }},
            "/healthz": {"get": {
                "summary": "Liveness", "operationId": "healthz",
                "responses": {"200": _json_answer("The process serves requests.", {
                    "type": "object", "required": ["status"],
                    "properties": {"status": {"type": "string", "enum": ["ok"]}}})},
            }},
            "/readyz": {"get": {
                "summary": "Readiness", "operationId": "readyz",
                "responses": {"200": _json_answer("Accepting records durably.", _READY),
                              "503": _json_answer("Not accepting records (starting, "
                                                  "shutting down).", _READY)},
            }},
            "/metrics": {"get": {
                "summary": "Prometheus metrics", "operationId": "metrics",
                "responses": {"200": {
                    "description": "The bridge's metrics, Prometheus text format 0.0.4.",
                    "content": {"text/plain": {"schema": {"type": "string"}}}}},
            }},
            "/openapi.json": {"get": {
                "summary": "This document", "operationId": "openapi",
                "responses": {"200": _json_answer("The ingress's OpenAPI document.",
                                                  {"type": "object"})},
            }},
        },
    }
