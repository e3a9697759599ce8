"""The operator API (``edgesync api``): send signed commands to edges, follow their
status, see the edges.

| method & path                          | what                                        |
| -------------------------------------- | ------------------------------------------- |
| ``POST /v1/edges/{edge}/commands``     | issue a command: 202 with its id            |
| ``GET  /v1/commands/{id}``             | one command, its lifecycle and its history  |
| ``GET  /v1/edges/{edge}/commands``     | an edge's commands (``?status=``)           |
| ``GET  /v1/edges``                     | edges: last seen, online, backlog, version  |
| ``GET  /healthz``, ``/readyz``, ``/metrics``, ``/docs``, ``/openapi.json`` |       |

Issuing a command: validate the spec (422 with a message), check the edge is
known (404), sign the envelope, store the command as ``pending`` (the row is
the source of truth), then publish it to ``<prefix>.ctl.<edge>`` with the
command id as ``Nats-Msg-Id``. If NATS is unreachable the request still
succeeds; a background loop publishes stored commands JetStream has not
acknowledged. Another loop marks commands ``expired`` that are still pending
at their expiry. Status reports from the edges reach the rows through the
ingest (:mod:`cloud_ingest.command_status`).

Writes need ``Authorization: Bearer <operator token>`` (401 otherwise); reads
are open unless ``read_requires_token``. Refusals are JSON
``{"error": code, "message": text}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import random
import socket
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
import structlog
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from broker import __version__
from broker.connecting import close_nats, connect_with_retry
from broker.errors import ClosedError, ConfigError
from broker.protocol.command_specs import (
    BridgeConfigure,
    ConfigMapPatch,
    DeploymentRestart,
    DeploymentScale,
    DeploymentSetEnv,
    DeploymentSetImage,
)
from broker.protocol.commands import CommandSigner, new_envelope
from broker.protocol.tokens import is_valid_token
from broker.protocol.topology import Topology
from broker.serving import embedded_server
from broker.settings import ApiSettings, NatsSettings
from cloud_ingest.command_status import expire_overdue
from cloud_ingest.pooling import close_pool, connect_pool
from cloud_ingest.schema import migrate

__all__ = ["Api", "create_app", "run"]

log = structlog.get_logger(__name__)

_PUBLISH_TIMEOUT_S = 2.0
"""A request waits this long for JetStream; after that the command is published later."""


# -- request and response models ---------------------------------------------------------


class _CommandRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl_seconds: float | None = Field(
        None, gt=0, description="Seconds the command stays valid (default from settings)."
    )
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=200,
        description="Retries with the same key return the same command (also a header).",
    )


class ScaleRequest(_CommandRequest):
    kind: Literal["deployment.scale"]
    spec: DeploymentScale


class SetEnvRequest(_CommandRequest):
    kind: Literal["deployment.set_env"]
    spec: DeploymentSetEnv


class SetImageRequest(_CommandRequest):
    kind: Literal["deployment.set_image"]
    spec: DeploymentSetImage


class RestartRequest(_CommandRequest):
    kind: Literal["deployment.restart"]
    spec: DeploymentRestart


class ConfigMapPatchRequest(_CommandRequest):
    kind: Literal["configmap.patch"]
    spec: ConfigMapPatch


class BridgeConfigureRequest(_CommandRequest):
    kind: Literal["bridge.configure"]
    spec: BridgeConfigure


CommandRequest = Annotated[
    ScaleRequest | SetEnvRequest | SetImageRequest | RestartRequest | ConfigMapPatchRequest
    | BridgeConfigureRequest,
    Field(discriminator="kind"),
]


class CommandAccepted(BaseModel):
    id: str
    edge: str
    kind: str
    status: str
    issued_at: datetime
    expires_at: datetime
    duplicate: bool = Field(description="True when this answers a repeated idempotency key.")


class CommandEventOut(BaseModel):
    status: str
    code: str
    reason: str
    result: dict[str, Any] | None
    edge: str = Field(description="The edge that reported it.")
    reported_at: datetime = Field(description="Edge clock.")
    received_at: datetime
    effective: bool = Field(description="Whether it changed the command's status.")


class CommandOut(BaseModel):
    id: str
    edge: str
    kind: str
    spec: dict[str, Any]
    issuer: str
    status: Literal["pending", "delivered", "applied", "failed", "rejected", "expired"]
    code: str | None
    reason: str | None
    result: dict[str, Any] | None
    idempotency_key: str | None
    issued_at: datetime
    expires_at: datetime
    published_at: datetime | None
    delivered_at: datetime | None
    finished_at: datetime | None
    finished_by: str | None
    history: list[CommandEventOut] | None = None


class EdgeOut(BaseModel):
    edge: str
    version: str
    last_seen: datetime
    seconds_since_seen: float
    online: bool
    buffer_records: int
    buffer_bytes: int
    unshipped_records: int
    oldest_unshipped_age_s: float
    disk_bytes: int
    dropped: dict[str, Any]


class _Refusal(Exception):
    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


# -- the service ------------------------------------------------------------------------------


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.issued = Counter("edgesync_commands_issued", "Commands issued, by kind.", ["kind"],
                              registry=r)
        self.expired = Counter("edgesync_commands_expired",
                               "Commands the cloud marked expired (never delivered).", registry=r)
        self.publish_failures = Counter(
            "edgesync_command_publish_failures", "Failed publishes of commands (retried).",
            registry=r)
        self.unpublished = Gauge(
            "edgesync_commands_unpublished", "Pending commands not yet in JetStream.", registry=r)
        self.requests = Counter("edgesync_api_requests", "API requests by method, route, status.",
                                ["method", "route", "status"], registry=r)


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=json.dumps,
                              decoder=json.loads)


class Api:
    """One API process: PostgreSQL pool, NATS, signer, HTTP socket, background loops."""

    def __init__(self, settings: ApiSettings, nats_settings: NatsSettings) -> None:
        self.settings = settings
        self.nats_settings = nats_settings
        self.topology = Topology(prefix=nats_settings.prefix, replicas=nats_settings.replicas)
        self.metrics = ApiMetrics()
        self.signer: CommandSigner | None = None
        self._pool: asyncpg.Pool | None = None
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._sock: socket.socket | None = None
        self._state = "new"

    async def __aenter__(self) -> Api:
        if self._state != "new":
            raise ClosedError(f"api is {self._state}; an Api starts once")
        self._state = "open"
        try:
            if self.settings.private_key_file is None:
                raise ConfigError("api.private_key_file is required: commands must be signed "
                                  "(create one with `edgesync keys generate`)")
            self.signer = CommandSigner.from_file(self.settings.private_key_file,
                                                  issuer=self.settings.issuer)
            self._sock = socket.create_server((self.settings.host, self.settings.port))
            self._sock.setblocking(False)
            self._pool = await connect_pool(
                self.settings.postgres_dsn, size=self.settings.pool_size, init=_init_connection,
                retry_max_s=self.settings.db_retry_max_s, command_timeout_s=30,
            )
            async with self._pool.acquire() as conn:
                await migrate(conn)
            self._nc = await connect_with_retry(self.nats_settings, name="edgesync-api")
            self._js = self._nc.jetstream(timeout=self.nats_settings.publish_timeout_s)
            # The ingest owns the streams; the API only checks the one it publishes to.
            await self.topology.require_streams(self._js, [self.topology.control_stream])
        except BaseException:
            await self.close()
            raise
        log.info("api_ready", key_id=self.signer.key_id, issuer=self.signer.issuer)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Release NATS, the pool and the socket; idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        if self._nc is not None:
            await close_nats(self._nc)
        if self._pool is not None:
            await close_pool(self._pool)
        if self._sock is not None:
            self._sock.close()
        log.info("api_stopped")

    @property
    def port(self) -> int:
        assert self._sock is not None, "api not started"
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        host = self.settings.host if self.settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self.port}"

    def _db(self) -> asyncpg.Pool:
        if self._pool is None or self._state != "open":
            raise ClosedError("api is not open")
        return self._pool

    # -- operations -------------------------------------------------------------------

    async def edge_exists(self, edge: str) -> bool:
        return bool(await self._db().fetchval(
            "SELECT EXISTS (SELECT 1 FROM edges WHERE edge_id = $1)", edge))

    async def issue(
        self,
        edge: str,
        kind: str,
        spec: dict[str, Any],
        *,
        ttl_s: float | None = None,
        idempotency_key: str | None = None,
        signer: CommandSigner | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Store, sign and publish one command (the spec must already be valid).

        Args:
            signer: another key than the configured one (key rotation, tests).

        Returns:
            The command row and whether it was created now (False: the
            idempotency key named an existing identical command).

        Raises:
            _Refusal: 409 when the idempotency key names a different command.
        """
        signer = signer or self.signer
        assert signer is not None
        envelope = new_envelope(edge=edge, kind=kind, spec=spec,
                                ttl_s=ttl_s or self.settings.default_ttl_s, issuer=signer.issuer)
        signed, digest = signer.sign(envelope)
        row = await self._db().fetchrow(
            "INSERT INTO commands (id, edge_id, kind, spec, issuer, idempotency_key, digest,"
            " signed, issued_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8,"
            " to_timestamp($9::float8), to_timestamp($10::float8))"
            " ON CONFLICT (edge_id, idempotency_key) DO NOTHING RETURNING *",
            uuid.UUID(envelope.id), edge, kind, spec, envelope.issuer, idempotency_key, digest,
            signed, envelope.issued_at, envelope.expires_at,
        )
        if row is None:
            existing = await self._db().fetchrow(
                "SELECT * FROM commands WHERE edge_id = $1 AND idempotency_key = $2",
                edge, idempotency_key)
            assert existing is not None
            if existing["kind"] != kind or existing["spec"] != spec:
                raise _Refusal(409, "idempotency_conflict",
                               f"idempotency key {idempotency_key!r} was used for a different "
                               f"command ({existing['id']})")
            return dict(existing), False
        self.metrics.issued.labels(kind).inc()
        log.info("command_issued", command=envelope.id, edge=edge, kind=kind,
                 expires_at=envelope.expires_at)
        await self._publish(envelope.id, edge, signed)
        return dict(row), True

    async def _publish(self, command_id: str, edge: str, signed: bytes) -> bool:
        js = self._js
        if js is None:
            return False
        try:
            await js.publish(self.topology.control_subject(edge), signed,
                             timeout=_PUBLISH_TIMEOUT_S, headers={"Nats-Msg-Id": command_id})
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.metrics.publish_failures.inc()
            log.warning("command_publish_failed", command=command_id, edge=edge,
                        error=f"{type(exc).__name__}: {exc}")
            return False
        await self._db().execute(
            "UPDATE commands SET published_at = now() WHERE id = $1 AND published_at IS NULL",
            uuid.UUID(command_id))
        log.debug("command_published", command=command_id, edge=edge)
        return True

    async def get_command(self, command_id: str) -> dict[str, Any] | None:
        """One command with its report history, or None."""
        try:
            key = uuid.UUID(command_id)
        except ValueError:
            return None
        row = await self._db().fetchrow("SELECT * FROM commands WHERE id = $1", key)
        if row is None:
            return None
        events = await self._db().fetch(
            "SELECT status, code, reason, result, edge_id, reported_at, received_at, effective"
            " FROM command_events WHERE command_id = $1 ORDER BY id", str(key))
        out = _command(row)
        out["history"] = [{**dict(e), "edge": e["edge_id"]} for e in events]
        return out

    async def list_commands(self, edge: str, *, status: str | None, limit: int
                            ) -> list[dict[str, Any]]:
        rows = await self._db().fetch(
            "SELECT * FROM commands WHERE edge_id = $1 AND ($2::text IS NULL OR status = $2)"
            " ORDER BY issued_at DESC LIMIT $3", edge, status, limit)
        return [_command(r) for r in rows]

    async def list_edges(self) -> list[dict[str, Any]]:
        rows = await self._db().fetch(
            "SELECT edge_id, version, last_seen,"
            " extract(epoch FROM now() - last_seen)::float8 AS ago, buffer_records,"
            " buffer_bytes, unshipped_records, oldest_unshipped_age_s, disk_bytes, dropped"
            " FROM edges ORDER BY edge_id")
        return [{
            "edge": r["edge_id"], "version": r["version"], "last_seen": r["last_seen"],
            "seconds_since_seen": max(0.0, r["ago"]),
            "online": r["ago"] <= self.settings.edge_offline_after_s,
            "buffer_records": r["buffer_records"], "buffer_bytes": r["buffer_bytes"],
            "unshipped_records": r["unshipped_records"],
            "oldest_unshipped_age_s": r["oldest_unshipped_age_s"],
            "disk_bytes": r["disk_bytes"], "dropped": r["dropped"] or {},
        } for r in rows]

    async def expire_overdue(self) -> int:
        """Mark pending commands past their expiry as ``expired``; returns how many."""
        async with self._db().acquire() as conn:
            expired = await expire_overdue(conn)
        for command_id, edge in expired:
            log.info("command_expired", command=command_id, edge=edge)
        self.metrics.expired.inc(len(expired))
        return len(expired)

    async def republish(self) -> int:
        """Publish pending commands JetStream has not acknowledged; returns how many."""
        rows = await self._db().fetch(
            "SELECT id, edge_id, signed FROM commands WHERE published_at IS NULL"
            " AND status = 'pending' AND expires_at > now() ORDER BY issued_at LIMIT 100")
        done = 0
        for r in rows:
            if not await self._publish(str(r["id"]), r["edge_id"], bytes(r["signed"])):
                break
            done += 1
        self.metrics.unpublished.set(len(rows) - done)
        return done

    # -- the service -----------------------------------------------------------------

    async def _every(self, interval: float, job: Callable[[], Awaitable[int]], name: str
                     ) -> None:
        while True:
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning(f"{name}_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))

    async def serve(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Serve HTTP and run the expiry and republish loops until ``stop`` is set."""
        assert self._sock is not None, "use `async with Api(...)` first"
        server = embedded_server(create_app(self))
        roots = [
            asyncio.create_task(server.serve(sockets=[self._sock]), name="http"),
            asyncio.create_task(self._every(self.settings.expiry_interval_s,
                                            self.expire_overdue, "expiry"), name="expiry"),
            asyncio.create_task(self._every(self.settings.republish_interval_s,
                                            self.republish, "republish"), name="republish"),
        ]
        while not server.started and not roots[0].done():  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        log.info("api_started", url=self.url)
        if ready is not None:
            ready.set()
        stopper = asyncio.create_task(stop.wait(), name="stop-wait")
        try:
            done, _ = await asyncio.wait([stopper, *roots], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper:
                    log.error("api_task_failed", task=task.get_name(),
                              error=repr(None if task.cancelled() else task.exception()))
        finally:
            stopper.cancel()
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(roots[0]), timeout=8)
            for task in roots[1:]:
                task.cancel()
            await asyncio.gather(*roots, return_exceptions=True)


def _command(row: asyncpg.Record) -> dict[str, Any]:
    out = {k: row[k] for k in (
        "kind", "spec", "issuer", "status", "code", "reason", "result", "idempotency_key",
        "issued_at", "expires_at", "published_at", "delivered_at", "finished_at", "finished_by")}
    out["id"] = str(row["id"])
    out["edge"] = row["edge_id"]
    return out


# -- HTTP ---------------------------------------------------------------------------------------


def _describe(errors: list[Any]) -> str:
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


def create_app(api: Api) -> FastAPI:
    """The FastAPI application of ``api`` (OpenAPI docs at ``/docs``)."""
    app = FastAPI(
        title="edgesync operator API", version=__version__,
        description="Signed control commands to edge sites, their status, and edge health.",
    )
    settings = api.settings

    @app.exception_handler(_Refusal)
    async def refused(request: Request, exc: _Refusal) -> Response:
        return JSONResponse({"error": exc.code, "message": exc.message},
                            status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = list(exc.errors())
        return JSONResponse(status_code=422, content={
            "error": "invalid_request", "message": _describe(errors),
            "detail": jsonable_encoder(errors, custom_encoder={Exception: str}),
        })

    @app.exception_handler(asyncpg.PostgresError)
    @app.exception_handler(asyncpg.InterfaceError)
    @app.exception_handler(OSError)
    async def unavailable(request: Request, exc: Exception) -> Response:
        log.warning("api_database_error", error=f"{type(exc).__name__}: {exc}")
        return JSONResponse({"error": "unavailable", "message": "database unavailable; retry"},
                            status_code=503, headers={"Retry-After": "1"})

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        route = request.scope.get("route")
        api.metrics.requests.labels(request.method, getattr(route, "path", "unmatched"),
                                    str(response.status_code)).inc()
        return response

    def token_ok(authorization: str | None) -> bool:
        expected = settings.operator_token
        if expected is None or not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), expected.get_secret_value().encode())

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if not token_ok(authorization):
            message = ("writes are disabled: no operator token is configured "
                       "(EDGESYNC_API__OPERATOR_TOKEN)" if settings.operator_token is None
                       else "missing or wrong operator token (Authorization: Bearer <token>)")
            raise _Refusal(401, "unauthorized", message,
                           headers={"WWW-Authenticate": 'Bearer realm="edgesync"'})

    def require_read(authorization: Annotated[str | None, Header()] = None) -> None:
        if settings.read_requires_token:
            require_token(authorization)

    def known_edge_token(edge: str) -> str:
        if not is_valid_token(edge):
            raise _Refusal(404, "unknown_edge", f"no edge {edge!r}: edge ids match "
                           "[A-Za-z0-9_-]{1,64}")
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
            raise _Refusal(422, "invalid_request", f"ttl_seconds: {ttl:g} exceeds the maximum "
                           f"of {settings.max_ttl_s:g}")
        if not await api.edge_exists(edge):
            raise _Refusal(404, "unknown_edge", f"edge {edge!r} has never reported to this "
                           "cloud (no heartbeat seen)")
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
            raise _Refusal(404, "unknown_command", f"no command {command_id!r}")
        return found

    @app.get("/v1/edges/{edge}/commands", response_model=list[CommandOut],
             dependencies=[Depends(require_read)], tags=["commands"])
    async def list_commands(
        edge: str,
        status: Annotated[Literal["pending", "delivered", "applied", "failed", "rejected",
                                  "expired"] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        """An edge's commands, newest first, optionally of one status."""
        known_edge_token(edge)
        if not await api.edge_exists(edge):
            raise _Refusal(404, "unknown_edge", f"edge {edge!r} has never reported")
        return await api.list_commands(edge, status=status, limit=limit)

    @app.get("/v1/edges", response_model=list[EdgeOut], dependencies=[Depends(require_read)],
             tags=["edges"])
    async def list_edges() -> list[dict[str, Any]]:
        """Every edge that has reported: last seen, online or not, backlog, version."""
        return await api.list_edges()

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        ok = api._nc is not None and api._nc.is_connected
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return PlainTextResponse(generate_latest(api.metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    return app


async def run(
    settings: ApiSettings,
    nats_settings: NatsSettings,
    *,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
) -> None:
    """Run the API until ``stop`` is set."""
    async with Api(settings, nats_settings) as api:
        await api.serve(stop, ready)
