"""The bridge's local HTTP ingress: where SDKs (or curl) hand over records.

The application (:func:`create_app`, FastAPI) serves health, readiness, metrics,
``/openapi.json`` and ``POST /v1/streams/{stream}/records``, whose logic is
:class:`~edge_bridge.ingress_records.RecordsEndpoint` (the protocol:
``docs/ingress-http.md``). What the bridge serves is :func:`create_ingress`: that
application behind the ASGI fast path of the records route
(:mod:`edge_bridge.ingress_fast_path`), which answers the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp

from edge_bridge.ingress_fast_path import RecordsFastPath
from edge_bridge.ingress_openapi import RECORDS_PATH, RESPONSES, STREAM_PARAMETER, request_body
from edge_bridge.ingress_records import RecordsEndpoint

if TYPE_CHECKING:
    from edge_bridge.bridge import Bridge

__all__ = ["create_app", "create_ingress"]


def create_ingress(bridge: Bridge) -> ASGIApp:
    """What the bridge serves: :func:`create_app` behind the records route's fast path."""
    endpoint = RecordsEndpoint(bridge)
    return RecordsFastPath(create_app(bridge, endpoint), endpoint)


def create_app(bridge: Bridge, endpoint: RecordsEndpoint | None = None) -> FastAPI:
    """The ingress application of one bridge (``endpoint``: the records route's logic,
    one of its own by default)."""
    app = FastAPI(
        title="edgesync edge bridge",
        version=bridge.version,
        description="Local ingress of an edgesync edge bridge. See docs/ingress-http.md.",
    )
    metrics = bridge.metrics
    records = endpoint or RecordsEndpoint(bridge)

    # The path parameter is read from the request and described by hand, like the body:
    # FastAPI's first typed parameter builds pydantic's validation machinery, about
    # 1 MiB of a bridge's idle memory, to check a name is_valid_token checks anyway.
    @app.post(RECORDS_PATH, responses=RESPONSES,
              openapi_extra={"requestBody": request_body(), "parameters": [STREAM_PARAMETER]})
    async def post_records(request: Request) -> Response:
        """Store records durably; the answer gives each its identity (see docs/ingress-http.md)."""
        return await records.respond(request.path_params["stream"], request.headers,
                                     request.stream())

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"})

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
