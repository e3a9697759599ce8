"""The operator API's service: its resources (PostgreSQL pool, NATS, signer,
listener), the operations behind the routes (issue, read, expire, republish),
and its root tasks (HTTP, expiry loop, republish loop, rollout driver) under one
supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import structlog
from nats.js import JetStreamContext

from broker.errors import (
    ClosedError,
    ConfigError,
    Conflict,
    EdgesyncError,
    InvalidInput,
    RequestTooLarge,
)
from broker.protocol.command_specs import masked_spec
from broker.protocol.command_status import CommandStatus
from broker.protocol.commands import MAX_COMMAND_BYTES, CommandSigner, new_envelope
from broker.protocol.topology import Topology
from broker.service import Supervisor
from broker.serving import HTTP_DRAIN_S, embedded_server, wait_started
from broker.settings import ApiSettings, NatsSettings
from broker.token_strength import check_token_strength
from cloud_ingest.api.routes import create_app
from cloud_ingest.cloud_service import CloudService
from cloud_ingest.command_status import expire_overdue
from cloud_ingest.db_errors import DATABASE_ERRORS, as_temporary
from cloud_ingest.desired import DesiredPublisher
from cloud_ingest.metrics import ApiMetrics, RolloutMetrics
from cloud_ingest.republishing import publish_each
from cloud_ingest.rollouts import RolloutDriver

__all__ = ["Api"]

log = structlog.get_logger(__name__)

_PUBLISH_TIMEOUT_S = 2.0
"""A request waits this long for JetStream; after that the command is published later."""


# -- the service ------------------------------------------------------------------------------


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=json.dumps,
                              decoder=json.loads)


class Api(CloudService):
    """One API process: PostgreSQL pool, NATS, signer, HTTP socket, background loops."""

    kind = "api"

    def __init__(self, settings: ApiSettings, nats_settings: NatsSettings) -> None:
        super().__init__(nats_settings,
                         Topology(prefix=nats_settings.prefix, replicas=nats_settings.replicas))
        self.settings = settings
        self.metrics = ApiMetrics()
        self.signer: CommandSigner | None = None
        self._js: JetStreamContext | None = None
        self.rollouts: RolloutDriver | None = None

    async def _open(self) -> None:
        for field in ("operator_token", "metrics_token"):
            secret = getattr(self.settings, field)
            if secret is None:
                continue
            try:
                check_token_strength(secret.get_secret_value(), what=f"api.{field}")
            except InvalidInput as exc:
                raise ConfigError(f"{exc} (EDGESYNC_API__{field.upper()}; unset it to "
                                  "rely on `edgesync operators` alone)") from exc
        if self.settings.private_key_file is None:
            raise ConfigError("api.private_key_file is required: commands must be signed "
                              "(create one with `edgesync keys generate`)")
        self.signer = CommandSigner.from_file(self.settings.private_key_file,
                                              issuer=self.settings.issuer)
        self._listen(self.settings.host, self.settings.port)
        await self._open_pool(
            self.settings.postgres_dsn, size=self.settings.pool_size, init=_init_connection,
            retry_max_s=self.settings.db_retry_max_s, command_timeout_s=30,
            acquire_timeout_s=self.settings.pool_acquire_timeout_s,
        )
        nc = await self._connect_nats("api")
        self._js = nc.jetstream(timeout=self.nats_settings.publish_timeout_s)
        # The ingest owns the streams; the API only checks the one it publishes to.
        await self.topology.require_streams(self._js, [self.topology.control_stream])
        self.rollouts = RolloutDriver(
            DesiredPublisher(signer=self.signer, topology=self.topology, js=self._js),
            offline_after_s=self.settings.edge_offline_after_s,
            metrics=RolloutMetrics(self.metrics.registry))
        log.info("api_ready", key_id=self.signer.key_id, issuer=self.signer.issuer)

    @property
    def url(self) -> str:
        host = self.settings.host if self.settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self.port}"

    def _db(self) -> asyncpg.Pool:
        if self._pool is None or not self.is_open:
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
        operator: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Store, sign and publish one command (the spec must already be valid).

        Args:
            signer: another key than the configured one (key rotation, tests).
            operator: who asked; the envelope's (signed) issuer becomes
                ``<operator>@<api issuer>``.

        Returns:
            The command row and whether it was created now (False: the
            idempotency key named an existing identical command).

        Raises:
            Conflict: the idempotency key names a different command (409).
        """
        signer = signer or self.signer
        assert signer is not None
        envelope = new_envelope(edge=edge, kind=kind, spec=spec,
                                ttl_s=ttl_s or self.settings.default_ttl_s,
                                issuer=f"{operator}@{signer.issuer}" if operator
                                else signer.issuer)
        signed, digest = signer.sign(envelope)
        if len(signed) > MAX_COMMAND_BYTES:
            # The edge refuses it unread (so it could never report on it), and past
            # nats-server's message limit no command behind it would be published.
            raise RequestTooLarge(f"the signed command is {len(signed)} bytes; an edge "
                                  f"accepts at most {MAX_COMMAND_BYTES}")
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
                raise Conflict(f"idempotency key {idempotency_key!r} was used for a different "
                               f"command ({existing['id']})", code="idempotency_conflict")
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

    async def list_commands(self, edge: str, *, status: CommandStatus | None, limit: int
                            ) -> list[dict[str, Any]]:
        rows = await self._db().fetch(
            "SELECT * FROM commands WHERE edge_id = $1 AND ($2::text IS NULL OR status = $2)"
            " ORDER BY issued_at DESC LIMIT $3", edge, None if status is None else status.value,
            limit)
        return [_command(r) for r in rows]

    async def list_edges(self, *, state: str | None = None, after: str | None = None,
                         limit: int = 1000, lagging_after_s: float = 60.0
                         ) -> list[dict[str, Any]]:
        """One page of edges in id order, after the edge id ``after`` (keyset
        pagination: a page costs the same at any depth), optionally only those
        ``online``, ``offline`` or ``lagging`` (online, oldest unshipped record older
        than ``lagging_after_s``)."""
        rows = await self._db().fetch(
            "SELECT edge_id, version, last_seen,"
            " extract(epoch FROM now() - last_seen)::float8 AS ago, buffer_records,"
            " buffer_bytes, unshipped_records, oldest_unshipped_age_s, disk_bytes, dropped"
            " FROM edges WHERE ($1::text IS NULL OR edge_id > $1) AND CASE $2::text"
            "  WHEN 'online' THEN last_seen > now() - make_interval(secs => $3)"
            "  WHEN 'offline' THEN last_seen <= now() - make_interval(secs => $3)"
            "  WHEN 'lagging' THEN last_seen > now() - make_interval(secs => $3)"
            "   AND oldest_unshipped_age_s > $4"
            "  ELSE true END"
            " ORDER BY edge_id LIMIT $5",
            after, state, self.settings.edge_offline_after_s, lagging_after_s, limit)
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
        async def publish(r: asyncpg.Record) -> bool | None:
            signed = bytes(r["signed"])
            if len(signed) <= MAX_COMMAND_BYTES:
                return await self._publish(str(r["id"]), r["edge_id"], signed)
            # Stored by an older API: it can never go. Failed with the reason, once.
            await self._db().execute(
                "UPDATE commands SET status = 'failed', finished_by = 'cloud',"
                " code = 'too_large', reason = $2, finished_at = now(),"
                " updated_at = now() WHERE id = $1 AND status = 'pending'",
                r["id"], f"the signed command is {len(signed)} bytes; an edge "
                f"accepts at most {MAX_COMMAND_BYTES}")
            log.error("command_too_large", command=str(r["id"]), edge=r["edge_id"],
                      bytes=len(signed))
            return None

        done = await publish_each(rows, publish)
        self.metrics.unpublished.set(len(rows) - done)
        return done

    async def drive_rollouts(self) -> int:
        """One pass of the rollout driver (:mod:`cloud_ingest.rollouts`); returns how many
        rollouts it advanced."""
        assert self.rollouts is not None
        try:
            return await self.rollouts.tick(self._db())
        except EdgesyncError as exc:  # a bug or bad row: logged, the loop goes on
            log.error("rollouts_tick_failed", error=f"{type(exc).__name__}: {exc}")
            return 0

    # -- the service -----------------------------------------------------------------

    async def _every(self, interval: float, job: Callable[[], Awaitable[int]], name: str
                     ) -> None:
        failures = 0
        while True:
            try:
                await job()
                failures = 0
            except asyncio.CancelledError:
                raise
            except DATABASE_ERRORS as exc:
                # The loop runs again at its interval either way; the classifier says
                # whether this looks like an outage or a refusal worth a louder line.
                failures += 1
                temporary = as_temporary(exc, attempt=failures)
                (log.warning if temporary is not None else log.error)(
                    f"{name}_failed", attempt=failures, temporary=temporary is not None,
                    error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))

    async def serve(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Serve HTTP and run the expiry and republish loops until ``stop`` is set.

        Raises:
            Exception: the error of the first root task that ended unasked
                (:class:`~broker.errors.RootTaskEnded` if it just returned).
        """
        server = embedded_server(create_app(self))
        async with Supervisor("api") as roots:
            http = roots.start(server.serve(sockets=[self.listener]), name="http")
            roots.start(self._every(self.settings.expiry_interval_s, self.expire_overdue,
                                    "expiry"), name="expiry")
            roots.start(self._every(self.settings.republish_interval_s, self.republish,
                                    "republish"), name="republish")
            roots.start(self._every(self.settings.rollout_interval_s, self.drive_rollouts,
                                    "rollouts"), name="rollouts")

            async def shutdown() -> None:
                server.should_exit = True  # in-flight requests finish; then the loops stop
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(http), timeout=HTTP_DRAIN_S)

            roots.on_shutdown(shutdown)
            if await wait_started(server, http):
                log.info("api_started", url=self.url)
                if ready is not None:
                    ready.set()
            await roots.wait(stop)


def _command(row: asyncpg.Record) -> dict[str, Any]:
    out = {k: row[k] for k in (
        "kind", "spec", "issuer", "status", "code", "reason", "result", "idempotency_key",
        "issued_at", "expires_at", "published_at", "delivered_at", "finished_at", "finished_by")}
    out["spec"] = masked_spec(row["kind"], row["spec"])  # plain env values never leave
    out["id"] = str(row["id"])
    out["edge"] = row["edge_id"]
    return out
