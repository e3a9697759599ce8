"""Versioned schema migrations, applied at start-up by whichever service starts first.

Migrations are ``migrations/NNN_name.sql`` files applied in order, each in its
own transaction, under an advisory lock so that concurrent replicas do not race.
They change tables and data only. The views (the stable contract analytics
read) are defined once, in their final form, in ``migrations/views.sql``, like
Flyway's repeatable migrations: each pending migration's transaction first
drops every view named there, then runs the migration, then creates again the
views whose ``-- @since NNN`` is at or below the version just applied. So at
every committed version exactly the views its tables can hold exist, a
migration never has to restate a view, and a database with nothing pending is
not touched. Changing a view therefore takes a migration (docs/schema.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable

import structlog

from cloud_ingest.db_errors import Connection

__all__ = ["View", "migrate", "views"]

log = structlog.get_logger(__name__)

_LOCK_KEY = 0x65_64_67_65_73_79_6E_63  # "edgesync"
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_SINCE = re.compile(r"^-- @since (\d{3})[ \t]*$", re.MULTILINE)
_CREATE_VIEW = re.compile(r"^CREATE VIEW (\w+) AS", re.MULTILINE)


@dataclass(frozen=True)
class View:
    """One view of ``views.sql``: its name, the first migration whose tables its final
    form reads, and its ``CREATE VIEW`` statement."""

    name: str
    since: int
    sql: str


def _migrations(folder: Traversable | None = None) -> list[tuple[int, str, str]]:
    """The numbered migrations in order; two files with one number, or a number
    missing between 1 and the last, are refused (one of them would be skipped)."""
    found = []
    if folder is None:
        folder = resources.files("cloud_ingest").joinpath("migrations")
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [version for version, _, _ in found]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migrations must be numbered 001, 002, ... without gaps or "
                         f"repeats; found {[name for _, name, _ in found]}")
    return found


def views() -> list[View]:
    """The views of ``migrations/views.sql``, in file order; a section without exactly
    one ``CREATE VIEW``, or text before the first ``-- @since``, is refused."""
    text = resources.files("cloud_ingest").joinpath("migrations/views.sql").read_text(
        encoding="utf-8")
    parts = _SINCE.split(text)
    if _CREATE_VIEW.search(parts[0]):
        raise ValueError("views.sql: a view before the first '-- @since NNN' line")
    found = []
    for since, sql in zip(parts[1::2], parts[2::2], strict=True):
        names = _CREATE_VIEW.findall(sql)
        if len(names) != 1:
            raise ValueError(f"views.sql: '-- @since {since}' must be followed by one "
                             f"CREATE VIEW, found {names or 'none'}")
        found.append(View(names[0], int(since), sql.strip()))
    return found


async def migrate(conn: Connection, *, upto: int | None = None) -> list[int]:
    """Apply pending migrations (those up to version ``upto``, when given); returns the
    versions applied now."""
    applied_now: list[int] = []
    defined = views()
    drop = "DROP VIEW IF EXISTS " + ", ".join(v.name for v in defined)
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
                await conn.execute(drop)
                await conn.execute(sql)
                for view in defined:
                    if view.since <= version:
                        await conn.execute(view.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations(version, name) VALUES ($1, $2)", version, name
                )
            applied_now.append(version)
            log.info("migration_applied", version=version, name=name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now
