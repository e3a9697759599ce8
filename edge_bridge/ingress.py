"""The bridge's local HTTP ingress: where SDKs (or curl) hand over records.

The application (:func:`create_app`, a plain Starlette application) serves health,
readiness, metrics, ``/openapi.json`` and ``POST /v1/streams/{stream}/records``,
whose logic is :class:`~edge_bridge.ingress_records.RecordsEndpoint` (the protocol:
``docs/ingress-http.md``). What the bridge serves is :func:`create_ingress`: that
application behind the ASGI fast path of the records route
(:mod:`edge_bridge.ingress_fast_path`), which answers the same.

No FastAPI here: the bridge has no typed parameter or body for it to check (the
records route reads its body itself), and importing it cost ~6 MiB of an idle
bridge's memory. The OpenAPI document is written out in
:mod:`edge_bridge.ingress_openapi`. Every refusal is JSON, ``{"error", "message"}``,
as the cloud API's are: an unknown path is ``404 not_found``, a known path with
another method ``405 method_not_allowed`` (with ``Allow``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from edge_bridge.ingress_fast_path import RecordsFastPath
from edge_bridge.ingress_openapi import RECORDS_PATH, document
from edge_bridge.ingress_records import RecordsEndpoint

if TYPE_CHECKING:
    from edge_bridge.bridge import Bridge

__all__ = ["create_app", "create_ingress"]

_REFUSALS: Final = {404: "not_found", 405: "method_not_allowed"}


def create_ingress(bridge: Bridge) -> ASGIApp:
    """What the bridge serves: :func:`create_app` behind the records route's fast path."""
    endpoint = RecordsEndpoint(bridge)
    return RecordsFastPath(create_app(bridge, endpoint), endpoint)


def create_app(bridge: Bridge, endpoint: RecordsEndpoint | None = None) -> Starlette:
    """The ingress application of one bridge (``endpoint``: the records route's logic,
    one of its own by default)."""
    metrics = bridge.metrics
    records = endpoint or RecordsEndpoint(bridge)
    openapi = document(bridge.version)

    async def post_records(request: Request) -> Response:
        return await records.respond(request.path_params["stream"], request.headers,
                                     request.stream())

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        # Ready means "accepting records durably"; NATS being down is not a reason
        # to refuse them (buffering through outages is the bridge's job).
        body = {"ready": bridge.accepting, "nats_connected": bridge.nats_connected}
        return JSONResponse(body, status_code=200 if bridge.accepting else 503)

    async def prometheus(request: Request) -> Response:
        await bridge.refresh_gauges()
        return PlainTextResponse(generate_latest(metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(openapi)

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = _REFUSALS.get(exc.status_code, "invalid_request")
        return JSONResponse({"error": code, "message": exc.detail},
                            status_code=exc.status_code, headers=exc.headers)

    return Starlette(
        routes=[
            Route(RECORDS_PATH, post_records, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
            Route("/openapi.json", openapi_json, methods=["GET"]),
        ],
        exception_handlers={HTTPException: refused},
    )
