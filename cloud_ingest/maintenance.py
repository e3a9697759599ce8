"""The ingest's upkeep of the data at rest: partitions created ahead, retention enforced.

One root task of each ingest process (:class:`Maintenance`): a round on start, then
one every ``maintenance_interval_s``. Rounds of several processes may overlap:
creating partitions is idempotent and takes turns, and retention runs in one
process at a time (:mod:`cloud_ingest.retention`). A failed round (database away)
is logged and counted, and the next one retries; it never stops the ingest.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime

import asyncpg
import structlog

from cloud_ingest.db_errors import DATABASE_ERRORS
from cloud_ingest.metrics import IngestMetrics
from cloud_ingest.partitioning import ensure_partitions
from cloud_ingest.retention import RetentionReport, enforce_retention

__all__ = ["Maintenance", "maintain_once"]

log = structlog.get_logger(__name__)


async def maintain_once(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
                        ahead_days: int, *, now: datetime | None = None,
                        metrics: IngestMetrics | None = None
                        ) -> tuple[list[str], RetentionReport]:
    """One round: create the partitions ahead, then enforce retention."""
    created = await ensure_partitions(conn, ahead_days,
                                      today=now.date() if now is not None else None)
    if metrics is not None:
        metrics.partitions_created.inc(len(created))
    return created, await enforce_retention(conn, now=now, metrics=metrics)


class Maintenance:
    """Runs :func:`maintain_once` on a timer until :meth:`begin_shutdown`."""

    def __init__(self, pool: asyncpg.Pool, *, ahead_days: int, interval_s: float,
                 metrics: IngestMetrics) -> None:
        self._pool = pool
        self._ahead = ahead_days
        self._interval = interval_s
        self._metrics = metrics
        self._stop = asyncio.Event()

    def begin_shutdown(self) -> None:
        self._stop.set()

    async def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                async with self._pool.acquire() as conn:
                    await maintain_once(conn, self._ahead, metrics=self._metrics)
            except DATABASE_ERRORS as exc:
                self._metrics.maintenance_failures.inc()
                log.warning("records_maintenance_failed", error=f"{type(exc).__name__}: {exc}")
            except Exception:  # upkeep must never stop the ingest; the next round retries
                self._metrics.maintenance_failures.inc()
                log.exception("records_maintenance_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval)
