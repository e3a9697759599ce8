"""The embedded nats-server as production runs it: TLS on, every client known.

:class:`SecuredNats` wraps :class:`EmbeddedNats` with what ``edgesync up`` and
the permission-matrix test need: a local CA and server certificate
(:mod:`broker.runtime.certificates`), the identities of the cloud services and
of every edge with their permissions (:mod:`broker.identities`), and a server
configuration that requires TLS and refuses anonymous clients. Adding or
revoking an edge re-renders the authorization and reloads the running server.

Layout under ``state_dir``: ``tls/`` (CA and server certificate), ``nats-auth/``
(identities, seeds, ``auth.conf``), ``nats.conf`` (includes ``auth.conf``).
Every directory is 0700 and every secret 0600.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from broker.connecting import close_nats, connect_once, connect_options
from broker.durable_files import write_private
from broker.identities import IdentityStore
from broker.protocol.permissions import Role, inbox_prefix
from broker.protocol.topology import Topology
from broker.runtime.certificates import CertificateAuthority
from broker.runtime.embedded_nats import EmbeddedNats
from broker.settings import NatsSettings

__all__ = [
    "NATS_MAX_PAYLOAD", "SecuredNats", "create_control_consumer", "restore_control_consumers",
]

log = structlog.get_logger(__name__)

NATS_MAX_PAYLOAD = 8 * 1024 * 1024
"""The largest message edgesync's own nats-server takes (``max_payload``): a batch of one
record of ``max_record_bytes`` (at most 4 MiB) and its framing fits, with room."""


async def create_control_consumer(admin: NatsSettings, topology: Topology, edge: str,
                                  *, ack_wait_s: float = 30.0) -> None:
    """Create (or update) edge ``edge``'s control consumer, as the admin identity.

    The edge may only pull from it; the cloud makes it. Creates the streams first
    if they are missing (a fresh server before any ingest ran).
    """
    nc = await _connect_admin(admin, topology)
    try:
        js = nc.jetstream(timeout=admin.publish_timeout_s)
        await _ensure_control_stream(js, topology)
        await js.add_consumer(topology.control_stream,
                              topology.control_consumer_config(edge, ack_wait_s=ack_wait_s))
        log.info("control_consumer_created", edge=edge,
                 durable=topology.control_durable(edge))
    finally:
        await close_nats(nc)


async def restore_control_consumers(admin: NatsSettings, topology: Topology,
                                    edges: Iterable[str], *, ack_wait_s: float = 30.0
                                    ) -> list[str]:
    """Create the control consumer of each of ``edges`` that JetStream does not hold
    (its store wiped or put back from an older copy), as the admin identity, over one
    connection; consumers that exist are left as they are. Returns the edges whose
    consumer was created."""
    nc = await _connect_admin(admin, topology)
    created = []
    try:
        js = nc.jetstream(timeout=admin.publish_timeout_s)
        await _ensure_control_stream(js, topology)
        for edge in edges:
            try:
                await js.consumer_info(topology.control_stream, topology.control_durable(edge))
                continue
            except NotFoundError:
                pass
            await js.add_consumer(topology.control_stream,
                                  topology.control_consumer_config(edge, ack_wait_s=ack_wait_s))
            created.append(edge)
            log.info("control_consumer_created", edge=edge,
                     durable=topology.control_durable(edge))
    finally:
        await close_nats(nc)
    return created


async def _connect_admin(admin: NatsSettings, topology: Topology) -> NATS:
    return await connect_once(
        [u.strip() for u in admin.url.split(",")], name="edgesync-admin",
        timeout_s=3 * admin.connect_timeout_s, connect_timeout=admin.connect_timeout_s,
        **connect_options(admin, inbox_prefix=inbox_prefix(topology, "admin")),
    )


async def _ensure_control_stream(js: JetStreamContext, topology: Topology) -> None:
    try:
        await js.stream_info(topology.control_stream)
    except NotFoundError:
        await topology.ensure_streams(js)


class SecuredNats:
    """A nats-server with TLS and authorization, and the identities to reach it.

    Args:
        state_dir: where certificates, identities and the JetStream store live.
        topology: the subjects permissions are rendered for.
        log_file: the server's log.
        port: client port; 0 picks a free one.
    """

    def __init__(self, state_dir: Path, topology: Topology | None = None, *,
                 log_file: Path | None = None, port: int = 0) -> None:
        self.state_dir = Path(state_dir).absolute()
        # Created private if missing; an existing directory keeps the mode its owner
        # gave it (edgesync up lets the PostgreSQL server's group traverse it). What
        # is secret below it (tls/, nats-auth/, the store) is 0700 on its own.
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.topology = topology or Topology()
        self.ca = CertificateAuthority(self.state_dir / "tls")
        self.identities = IdentityStore(self.state_dir / "nats-auth", self.topology)
        self.identities.ensure_services()
        self.config_file = self.state_dir / "nats.conf"
        store = self.state_dir / "nats"
        store.mkdir(exist_ok=True, mode=0o700)
        store.chmod(0o700)
        self.server = EmbeddedNats(store, config_file=self.config_file, log_file=log_file,
                                   port=port)

    def _write_config(self) -> None:
        tls = self.ca.issue("nats-server")  # fresh each start: never an expired one
        write_private(self.config_file, (
            "# Generated by edgesync (broker/runtime/secured_nats.py) at each start.\n"
            # A batch of one record of max_record_bytes (at most 4 MiB) and its framing
            # must fit in one message; nats-server's default (1MB) did not hold a 1 MiB
            # record's.
            f"max_payload: {NATS_MAX_PAYLOAD}\n"
            f"tls {{\n  cert_file: {json.dumps(str(tls.cert_file))}\n"
            f"  key_file: {json.dumps(str(tls.key_file))}\n"
            f"  ca_file: {json.dumps(str(tls.ca_file))}\n  timeout: 2\n}}\n"
            # nats-server resolves an include relative to the including file, always.
            f"include {json.dumps(os.path.relpath(self.identities.auth_conf, self.state_dir))}\n"
        ))

    @property
    def url(self) -> str:
        return self.server.url

    def settings_for(self, role: Role, edge: str | None = None, **fields: Any
                     ) -> NatsSettings:
        """Client settings of one identity: this server, its seed, the CA."""
        if role == "edge":
            assert edge is not None
            creds = self.identities.edge_credentials(edge)
        else:
            creds = self.identities.credentials_file(role)
        values: dict[str, Any] = {"url": self.url, "prefix": self.topology.prefix,
                                  "credentials_file": creds, "ca_file": self.ca.ca_file}
        return NatsSettings(**(values | fields))

    async def add_edge(self, edge: str, *, control_consumer: bool = True) -> NatsSettings:
        """Provision ``edge``: identity, reload, and (by default) its control consumer."""
        self.identities.add_edge(edge)
        if self.server.running:
            await self.server.reload()
            if control_consumer:
                await create_control_consumer(self.settings_for("admin"), self.topology, edge)
        return self.settings_for("edge", edge)

    async def revoke_edge(self, edge: str) -> bool:
        """Remove ``edge``'s identity; the reload closes its connection and refuses it."""
        removed = self.identities.revoke_edge(edge)
        if removed and self.server.running:
            await self.server.reload()
        log.info("edge_revoked", edge=edge, was_registered=removed)
        return removed

    async def start(self) -> None:
        self._write_config()
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()
