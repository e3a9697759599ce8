"""The day partitions of ``records``: created ahead of the ingest, listed, dropped.

Migration 008 partitions ``records`` by ``received_at``, one partition per UTC day
named ``records_pYYYYMMDD``. The ingest keeps :data:`ahead <ensure_partitions>`
days' partitions ready (on start and on a timer, :class:`Maintenance`), so a write
never waits for one; creating is idempotent and several ingest processes (or the
CLI) may do it at once (``es_records_partition`` takes turns under an advisory lock
and attaches a ready table, which blocks neither writers nor readers).

Dropping is :mod:`cloud_ingest.retention`'s decision; :func:`drop_partition` is
the mechanics: ``DETACH PARTITION ... CONCURRENTLY`` (readers and writers of the
other days go on), then ``DROP TABLE``; a detach interrupted half way is
finalized on the next attempt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import structlog

from cloud_ingest.db_errors import Connection

__all__ = [
    "PARTITION_NAME",
    "Partition",
    "drop_partition",
    "ensure_partitions",
    "list_partitions",
]

log = structlog.get_logger(__name__)

PARTITION_NAME = re.compile(r"^records_p(\d{4})(\d{2})(\d{2})$")
"""The names migration 008's ``es_records_partition`` gives (one UTC day each)."""


@dataclass(frozen=True, slots=True)
class Partition:
    """One day partition of ``records``: rows with ``lower <= received_at < upper``."""

    name: str
    day: date
    attached: bool
    """False for a partition whose concurrent detach was interrupted."""

    @property
    def lower(self) -> datetime:
        return datetime(self.day.year, self.day.month, self.day.day, tzinfo=UTC)

    @property
    def upper(self) -> datetime:
        return self.lower + timedelta(days=1)


async def list_partitions(conn: Connection) -> list[Partition]:
    """The day partitions of ``records``, oldest first (others are ignored)."""
    rows = await conn.fetch(
        "SELECT c.relname, NOT i.inhdetachpending AS attached FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'records'::regclass")
    out = []
    for name, attached in rows:
        m = PARTITION_NAME.match(name)
        if m is None:
            log.warning("records_partition_unknown", partition=name)
            continue
        out.append(Partition(name, date(int(m[1]), int(m[2]), int(m[3])), attached))
    return sorted(out, key=lambda p: p.day)


async def ensure_partitions(conn: Connection, ahead_days: int, *,
                            today: date | None = None) -> list[str]:
    """Create the partitions of ``today`` (UTC) and the ``ahead_days`` after it that are
    missing; returns the names created now. Idempotent, safe to run concurrently."""
    first = today or datetime.now(UTC).date()
    created = [r[0] for r in await conn.fetch(
        "SELECT p FROM generate_series($1::date, $1::date + $2::int, interval '1 day') AS d, "
        "es_records_partition(d::date) AS p WHERE p IS NOT NULL", first, ahead_days)]
    for name in created:
        log.info("records_partition_created", partition=name)
    return created


async def drop_partition(conn: Connection, partition: Partition) -> None:
    """Detach ``partition`` without blocking the other days, then drop it.

    Must run outside a transaction (``DETACH ... CONCURRENTLY`` cannot run in one).
    """
    name = _quoted(partition.name)
    if partition.attached:
        await conn.execute(f"ALTER TABLE records DETACH PARTITION {name} CONCURRENTLY")
    else:
        await conn.execute(f"ALTER TABLE records DETACH PARTITION {name} FINALIZE")
    await conn.execute(f"DROP TABLE {name}")
    log.info("records_partition_dropped", partition=partition.name)


def _quoted(name: str) -> str:
    if PARTITION_NAME.match(name) is None:  # never interpolate anything else
        raise ValueError(f"not a records partition: {name!r}")
    return f'"{name}"'
