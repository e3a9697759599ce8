"""The operator API's HTTP surface: routes, refusals and request metrics.

Every refusal is an :class:`~broker.errors.EdgesyncError` turned into JSON
``{"error": code, "message": text}`` with the status of the one table in
:mod:`broker.errors`; a database that is unavailable is a 503 with
``Retry-After`` (decided by :mod:`cloud_ingest.db_errors`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import structlog
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from broker import __version__
from broker.errors import EdgesyncError, InvalidInput, NotFound, Unauthorized
from broker.protocol.command_specs import describe_validation_error
from broker.protocol.command_status import CommandStatus
from broker.protocol.tokens import TOKEN_PATTERN, is_valid_token
from broker.serving import error_response
from cloud_ingest.api.auth import CHALLENGE, read_guard, write_guard
from cloud_ingest.api.models import CommandAccepted, CommandOut, CommandRequest, EdgeOut
from cloud_ingest.api.records import record_routes
from cloud_ingest.db_errors import DATABASE_ERRORS, as_temporary
from cloud_ingest.dead_letters import dead_letter_routes

if TYPE_CHECKING:
    from cloud_ingest.api.service import Api

__all__ = ["create_app"]

log = structlog.get_logger(__name__)


def create_app(api: Api) -> FastAPI:
    """The FastAPI application of ``api`` (OpenAPI docs at ``/docs``)."""
    app = FastAPI(
        title="edgesync operator API", version=__version__,
        description="Signed control commands to edge sites, their status, and edge health.",
    )
    settings = api.settings
    require_token = write_guard(settings)
    require_read = read_guard(settings)

    @app.exception_handler(EdgesyncError)
    async def refused(request: Request, exc: EdgesyncError) -> Response:
        return error_response(exc, headers=CHALLENGE if isinstance(exc, Unauthorized) else None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = list(exc.errors())
        return JSONResponse(status_code=422, content={
            "error": "invalid_request", "message": describe_validation_error(errors),
            "detail": jsonable_encoder(errors, custom_encoder={Exception: str}),
        })

    async def database_error(request: Request, exc: Exception) -> Response:
        log.warning("api_database_error", error=f"{type(exc).__name__}: {exc}")
        temporary = as_temporary(exc)
        if temporary is None:
            return JSONResponse({"error": "database_error", "message": "the database refused "
                                 "the request"}, status_code=500)
        return error_response(temporary, message="database unavailable; retry")

    for foreign in DATABASE_ERRORS:
        app.add_exception_handler(foreign, database_error)

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        route = request.scope.get("route")
        api.metrics.requests.labels(request.method, getattr(route, "path", "unmatched"),
                                    str(response.status_code)).inc()
        return response

    def known_edge_token(edge: str) -> str:
        if not is_valid_token(edge):
            raise NotFound(f"no edge {edge!r}: edge ids match {TOKEN_PATTERN}",
                           code="unknown_edge")
        return edge

    @app.post("/v1/edges/{edge}/commands", status_code=202, response_model=CommandAccepted,
              dependencies=[Depends(require_token)], tags=["commands"],
              responses={401: {}, 404: {}, 409: {}, 422: {}})
    async def post_command(
        edge: str, body: CommandRequest, response: Response,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> dict[str, Any]:
        """Issue a signed command to one edge; follow it at ``/v1/commands/{id}``."""
        known_edge_token(edge)
        ttl = body.ttl_seconds or settings.default_ttl_s
        if ttl > settings.max_ttl_s:
            raise InvalidInput(f"ttl_seconds: {ttl:g} exceeds the maximum of "
                               f"{settings.max_ttl_s:g}", code="invalid_request")
        if not await api.edge_exists(edge):
            raise NotFound(f"edge {edge!r} has never reported to this cloud (no heartbeat "
                           "seen)", code="unknown_edge")
        key = idempotency_key or body.idempotency_key
        row, created = await api.issue(
            edge, body.kind, body.spec.model_dump(mode="json", exclude_unset=True),
            ttl_s=ttl, idempotency_key=key)
        response.headers["Location"] = f"/v1/commands/{row['id']}"
        return {"id": str(row["id"]), "edge": edge, "kind": row["kind"],
                "status": row["status"], "issued_at": row["issued_at"],
                "expires_at": row["expires_at"], "duplicate": not created}

    @app.get("/v1/commands/{command_id}", response_model=CommandOut,
             dependencies=[Depends(require_read)], tags=["commands"])
    async def get_command(command_id: str) -> dict[str, Any]:
        """One command: its spec, status, timestamps, result and every status report."""
        found = await api.get_command(command_id)
        if found is None:
            raise NotFound(f"no command {command_id!r}", code="unknown_command")
        return found

    @app.get("/v1/edges/{edge}/commands", response_model=list[CommandOut],
             dependencies=[Depends(require_read)], tags=["commands"])
    async def list_commands(
        edge: str,
        status: Annotated[CommandStatus | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        """An edge's commands, newest first, optionally of one status."""
        known_edge_token(edge)
        if not await api.edge_exists(edge):
            raise NotFound(f"edge {edge!r} has never reported", code="unknown_edge")
        return await api.list_commands(edge, status=status, limit=limit)

    @app.get("/v1/edges", response_model=list[EdgeOut], dependencies=[Depends(require_read)],
             tags=["edges"])
    async def list_edges(
        response: Response,
        state: Annotated[Literal["online", "offline", "lagging"] | None, Query(
            description="Only edges in this state; lagging = online with its oldest "
                        "unshipped record older than lagging_after_s.")] = None,
        after: Annotated[str | None, Query(
            description="Page after this edge id (the X-Next-After of the last page).")]
        = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
        lagging_after_s: Annotated[float, Query(ge=0)] = 60.0,
    ) -> list[dict[str, Any]]:
        """Edges that have reported, in id order, a page at a time: last seen, online or
        not, backlog, version. A full page carries ``X-Next-After``: pass it as ``after``."""
        edges = await api.list_edges(state=state, after=after, limit=limit,
                                     lagging_after_s=lagging_after_s)
        if len(edges) == limit:
            response.headers["X-Next-After"] = edges[-1]["edge"]
        return edges

    app.include_router(dead_letter_routes(
        api._db, read=Depends(require_read), write=Depends(require_token)))
    app.include_router(record_routes(  # committed records, tail, checkpoints (issue 13)
        api._db, settings.postgres_dsn, read=Depends(require_read)))

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        ok = api.nats_connected
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return PlainTextResponse(generate_latest(api.metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    return app
