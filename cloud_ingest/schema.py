"""Versioned schema migrations, applied at start-up by whichever service starts first.

Migrations are ``migrations/NNN_name.sql`` files applied in order, each in its
own transaction, under an advisory lock so that concurrent replicas do not race.
"""

from __future__ import annotations

import re
from importlib import resources

import structlog

from cloud_ingest.db_errors import Connection

__all__ = ["migrate"]

log = structlog.get_logger(__name__)

_LOCK_KEY = 0x65_64_67_65_73_79_6E_63  # "edgesync"
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


def _migrations() -> list[tuple[int, str, str]]:
    found = []
    for entry in resources.files("cloud_ingest").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


async def migrate(conn: Connection, *, upto: int | None = None) -> list[int]:
    """Apply pending migrations (those up to version ``upto``, when given); returns the
    versions applied now."""
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in _migrations():
            if version in done or (upto is not None and version > upto):
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations(version, name) VALUES ($1, $2)", version, name
                )
            applied_now.append(version)
            log.info("migration_applied", version=version, name=name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now
