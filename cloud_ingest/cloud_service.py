"""What both cloud services (the ingest and the API) hold and release the same way.

A :class:`CloudService` owns one PostgreSQL pool, migrated as it opens, and one
NATS connection named after the service, with the service's inbox prefix; its
``_close`` releases both (the listening socket is the skeleton's,
:class:`broker.service.Service`) and logs ``<kind>_stopped``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg
import structlog
from nats.aio.client import Client as NATS

from broker.connecting import close_nats, connect_with_retry
from broker.protocol.permissions import Role, inbox_prefix
from broker.protocol.topology import Topology
from broker.service import Service
from broker.settings import NatsSettings
from cloud_ingest.pooling import close_pool, connect_pool
from cloud_ingest.schema import migrate

__all__ = ["CloudService"]

log = structlog.get_logger(__name__)


class CloudService(Service):
    """A :class:`~broker.service.Service` holding a migrated pool and a NATS connection."""

    def __init__(self, nats_settings: NatsSettings, topology: Topology) -> None:
        super().__init__()
        self.nats_settings = nats_settings
        self.topology = topology
        self._nc: NATS | None = None
        self._pool: asyncpg.Pool | None = None

    async def _open_pool(
        self,
        dsn: str,
        *,
        size: int,
        init: Callable[[asyncpg.Connection[asyncpg.Record]], Coroutine[Any, Any, None]],
        retry_max_s: float,
        command_timeout_s: float = 60.0,
        acquire_timeout_s: float | None = None,
    ) -> asyncpg.Pool:
        """Connect the pool (retrying until PostgreSQL answers) and apply pending
        migrations before anything else uses it."""
        self._pool = await connect_pool(dsn, size=size, init=init, retry_max_s=retry_max_s,
                                        command_timeout_s=command_timeout_s,
                                        acquire_timeout_s=acquire_timeout_s)
        async with self._pool.acquire() as conn:
            await migrate(conn)
        return self._pool

    async def _connect_nats(self, role: Role, *, client: Callable[[], NATS] = NATS) -> NATS:
        """Connect as ``edgesync-<role>`` with that identity's inbox prefix (retrying);
        ``client`` makes the unconnected client (nats-py's, or a subclass)."""
        self._nc = await connect_with_retry(
            self.nats_settings, name=f"edgesync-{role}",
            inbox_prefix=inbox_prefix(self.topology, role), client=client)
        return self._nc

    async def _close(self) -> None:
        """Release NATS and the pool (the socket is the skeleton's)."""
        if self._nc is not None:
            await close_nats(self._nc)
        if self._pool is not None:
            await close_pool(self._pool)
        log.info(f"{self.kind}_stopped")  # ingest_stopped, api_stopped

    @property
    def nats_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected
