"""The operator API's HTTP surface: routes, refusals and request metrics.

Every refusal is an :class:`~broker.errors.EdgesyncError` turned into JSON
``{"error": code, "message": text}`` with the status of the one table in
:mod:`broker.errors`; a database that is unavailable is a 503 with
``Retry-After`` (decided by :mod:`cloud_ingest.db_errors`). Starlette's own
refusals (no such route, wrong method, a body that is not UTF-8) get the same
shape. Authentication, the body limit and the audit log are
:class:`~cloud_ingest.api.auth.ApiGuard`'s; scopes are checked per route.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import asyncpg
import structlog
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker import __version__
from broker.errors import EdgesyncError, Forbidden, InvalidInput, NotFound, Unauthorized
from broker.protocol.command_specs import describe_validation_error
from broker.protocol.command_status import CommandStatus
from broker.protocol.commands import IDEMPOTENCY_KEY_MAX
from broker.protocol.tokens import TOKEN_PATTERN, is_valid_token
from broker.serving import error_response
from cloud_ingest.api.auth import CHALLENGE, ApiGuard, Authenticator, require_scope
from cloud_ingest.api.desired_routes import desired_routes
from cloud_ingest.api.models import (
    AuditOut,
    CommandAccepted,
    CommandOut,
    CommandRequest,
    EdgeOut,
    ErrorOut,
    OperatorOut,
)
from cloud_ingest.api.records import TailLimit, record_routes
from cloud_ingest.console import PREFIX as CONSOLE_PREFIX
from cloud_ingest.console import mount_console
from cloud_ingest.db_errors import DATABASE_ERRORS, as_temporary, is_contention
from cloud_ingest.dead_letters import dead_letter_routes
from cloud_ingest.operators import Operator, command_scope, list_audit, list_operators
from cloud_ingest.strict_json import StrictJsonRoute

if TYPE_CHECKING:
    from cloud_ingest.api.service import Api

__all__ = ["ERROR_RESPONSES", "create_app"]

log = structlog.get_logger(__name__)


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorOut, "description": description}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _error("No operator token, or an unknown or revoked one."),
    403: _error("The operator's token lacks the scope this needs."),
    413: _error("Request body above api.max_body_bytes (1 MiB)."),
    422: _error("The request does not validate; the message names the field."),
}
"""Refusals every guarded route can answer, as the OpenAPI document lists them."""

_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: _error("No such edge or command.")}


def _bad_value(exc: Exception) -> bool:
    """A database error caused by a request's value: PostgreSQL's data exceptions
    (SQLSTATE class 22: out of range, NUL in text, ...) or asyncpg refusing to encode an
    argument (its client-side DataError, the InterfaceError that is also a ValueError)."""
    return isinstance(exc, asyncpg.DataError) or (
        isinstance(exc, asyncpg.InterfaceError) and isinstance(exc, ValueError))


def create_app(api: Api) -> FastAPI:
    """The FastAPI application of ``api`` (OpenAPI docs at ``/docs``)."""
    app = FastAPI(
        title="edgesync operator API", version=__version__,
        description="Signed control commands to edge sites, their status, and edge health.",
    )
    app.router.route_class = StrictJsonRoute  # before any route: bodies as strict JSON
    settings = api.settings
    app.state.authenticator = authenticator = Authenticator(settings, api._db)
    require_read = Depends(require_scope("read"))
    require_admin = Depends(require_scope("admin"))

    @app.exception_handler(EdgesyncError)
    async def refused(request: Request, exc: EdgesyncError) -> Response:
        return error_response(exc, headers=CHALLENGE if isinstance(exc, Unauthorized) else None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = list(exc.errors())
        return JSONResponse(status_code=422, content={
            "error": "invalid_request", "message": describe_validation_error(errors),
            # Where and what, not the value refused: echoed, a value JSON cannot hold
            # made the answer itself fail (a 500), and a secret sent by mistake came back.
            "detail": [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in errors],
        })

    @app.exception_handler(StarletteHTTPException)
    async def http_refusal(request: Request, exc: StarletteHTTPException) -> Response:
        # Starlette's own: unknown route (404), wrong method (405), a body FastAPI cannot
        # read (400, e.g. not UTF-8). Same shape as ours, never {"detail": ...}.
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code,
                                                                 "invalid_request")
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 400:
            message = f"{message}: send UTF-8 JSON (Content-Type: application/json)"
        return JSONResponse({"error": code, "message": message}, status_code=exc.status_code,
                            headers=exc.headers)

    async def database_error(request: Request, exc: Exception) -> Response:
        if _bad_value(exc):  # the request's value, not the database: the client's to fix
            return error_response(InvalidInput(
                f"a value of the request is out of range: {exc}", code="invalid_request"))
        log.warning("api_database_error", error=f"{type(exc).__name__}: {exc}")
        temporary = as_temporary(exc)
        if temporary is None:
            return JSONResponse({"error": "database_error", "message": "the database refused "
                                 "the request"}, status_code=500)
        if isinstance(exc, asyncpg.QueryCanceledError):  # 57014: no outage, a limit
            return error_response(temporary, message=(
                "the database canceled the query (its statement_timeout, or an "
                "administrator); retry, or ask for less: a shorter time range, a smaller "
                "page"))
        busy = "database busy" if is_contention(exc) else "database unavailable"
        return error_response(temporary, message=f"{busy}; retry")

    for foreign in DATABASE_ERRORS:
        app.add_exception_handler(foreign, database_error)

    app.add_middleware(ApiGuard, authenticator=authenticator, pool=api._db,
                       max_body_bytes=settings.max_body_bytes, session_prefixes=(CONSOLE_PREFIX,))

    @app.middleware("http")  # outside the guard: refusals are counted too
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
              tags=["commands"], responses={
                  **ERROR_RESPONSES, **_NOT_FOUND,
                  409: _error("The idempotency key was used for another command.")})
    async def post_command(  # noqa: PLR0917 (FastAPI injects by name)
        edge: str, body: CommandRequest, request: Request, response: Response,
        operator: Operator = require_read,
        idempotency_key: Annotated[str | None, Header(max_length=IDEMPOTENCY_KEY_MAX)] = None,
    ) -> dict[str, Any]:
        """Issue a signed command to one edge; follow it at ``/v1/commands/{id}``.
        Needs the ``operate`` scope, or ``operate:<kind>`` for this kind."""
        request.state.audit = {"action": "command.issue", "target": edge, "kind": body.kind}
        if not operator.allows(command_scope(body.kind)):
            raise Forbidden(f"operator {operator.name!r} may not send {body.kind} commands "
                            f"(needs the operate or {command_scope(body.kind)} scope)")
        known_edge_token(edge)
        ttl = settings.default_ttl_s if body.ttl_seconds is None else body.ttl_seconds
        if ttl > settings.max_ttl_s:
            raise InvalidInput(f"ttl_seconds: {ttl:g} exceeds the maximum of "
                               f"{settings.max_ttl_s:g}", code="invalid_request")
        if ttl < settings.min_ttl_s:
            raise InvalidInput(f"ttl_seconds: {ttl:g} is below the minimum of "
                               f"{settings.min_ttl_s:g}", code="invalid_request")
        if not await api.edge_exists(edge):
            raise NotFound(f"edge {edge!r} has never reported to this cloud (no heartbeat "
                           "seen)", code="unknown_edge")
        key = idempotency_key or body.idempotency_key
        row, created = await api.issue(
            edge, body.kind, body.spec.model_dump(mode="json", exclude_unset=True),
            ttl_s=ttl, idempotency_key=key, operator=operator.name)
        request.state.audit.update(command=str(row["id"]), duplicate=not created)
        response.headers["Location"] = f"/v1/commands/{row['id']}"
        return {"id": str(row["id"]), "edge": edge, "kind": row["kind"],
                "status": row["status"], "issued_at": row["issued_at"],
                "expires_at": row["expires_at"], "duplicate": not created}

    @app.get("/v1/commands/{command_id}", response_model=CommandOut,
             dependencies=[require_read], tags=["commands"],
             responses={**ERROR_RESPONSES, **_NOT_FOUND})
    async def get_command(command_id: str) -> dict[str, Any]:
        """One command: its spec, status, timestamps, result and every status report."""
        found = await api.get_command(command_id)
        if found is None:
            raise NotFound(f"no command {command_id!r}", code="unknown_command")
        return found

    @app.get("/v1/edges/{edge}/commands", response_model=list[CommandOut],
             dependencies=[require_read], tags=["commands"],
             responses={**ERROR_RESPONSES, **_NOT_FOUND})
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

    @app.get("/v1/edges", response_model=list[EdgeOut], dependencies=[require_read],
             tags=["edges"], responses=ERROR_RESPONSES)
    async def list_edges(
        response: Response,
        state: Annotated[Literal["online", "offline", "lagging"] | None, Query(
            description="Only edges in this state; lagging = online with its oldest "
                        "unshipped record older than lagging_after_s.")] = None,
        after: Annotated[str | None, Query(
            description="Page after this edge id (the X-Next-After of the last page).")]
        = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
        lagging_after_s: Annotated[float, Query(ge=0, le=10 * 365 * 86400)] = 60.0,
    ) -> list[dict[str, Any]]:
        """Edges that have reported, in id order, a page at a time: last seen, online or
        not, backlog, version. A full page carries ``X-Next-After``: pass it as ``after``."""
        edges = await api.list_edges(state=state, after=after, limit=limit,
                                     lagging_after_s=lagging_after_s)
        if len(edges) == limit:
            response.headers["X-Next-After"] = edges[-1]["edge"]
        return edges

    app.include_router(dead_letter_routes(
        api._db, read=require_read, write=Depends(require_scope("operate"))),
        responses=ERROR_RESPONSES)
    app.include_router(desired_routes(  # desired state, labels, rollouts
        api, read=require_read, write=Depends(require_scope("operate"))),
        responses={**ERROR_RESPONSES, **_NOT_FOUND,
                   409: _error("The rollout's state does not allow that action."),
                   503: _error("NATS did not acknowledge the desired state; retry.")})
    # One count of the streams that hold a PostgreSQL connection each, for the API's
    # live tails and NDJSON streams and the console's live tail alike.
    tails = TailLimit(settings.max_live_tails, api.metrics.live_tails,
                      api.metrics.tails_refused, per_operator=settings.max_streams_per_operator)
    app.include_router(record_routes(  # committed records, tail, checkpoints
        api._db, settings.postgres_dsn, read=require_read,
        commit=Depends(require_scope("consume")), tails=tails,
        page_max_bytes=settings.page_max_bytes),
        responses=ERROR_RESPONSES)

    @app.get("/v1/audit", response_model=list[AuditOut], dependencies=[require_admin],
             tags=["operators"], responses=ERROR_RESPONSES)
    async def get_audit(
        response: Response,
        before: Annotated[int | None, Query(
            ge=1, le=2**63 - 1, description="Page: rows with ids below this (the "
            "X-Next-Before of the last page).")] = None,
        operator: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        """The audit log, newest first: who did what, when, from where (admin scope)."""
        async with api._db().acquire() as conn:
            rows = await list_audit(conn, before=before, limit=limit, operator=operator)
        if len(rows) == limit:
            response.headers["X-Next-Before"] = str(rows[-1]["id"])
        return rows

    @app.get("/v1/operators", response_model=list[OperatorOut], dependencies=[require_admin],
             tags=["operators"], responses=ERROR_RESPONSES)
    async def get_operators(
        revoked: Annotated[bool, Query(description="Include revoked operators.")] = False,
    ) -> list[dict[str, Any]]:
        """Operators, their scopes and the first characters of their tokens (admin scope;
        add and revoke them with `edgesync operators`)."""
        async with api._db().acquire() as conn:
            return await list_operators(conn, include_revoked=revoked)

    mount_console(app, api, tails=tails)  # the operator console under /ui (own login, same scopes)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        ok = api.nats_connected
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)  # ApiGuard: metrics token or read scope
    async def metrics(request: Request) -> Response:
        operator: Operator | None = getattr(request.state, "operator", None)
        if operator is not None and not operator.allows("read"):
            raise Forbidden(f"operator {operator.name!r} lacks the 'read' scope")
        return PlainTextResponse(generate_latest(api.metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    return app
