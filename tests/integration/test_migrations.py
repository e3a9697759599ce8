"""The migration runner and the views file: migrations change tables, views.sql holds
every view once, and whatever path a database took it ends with the same schema."""

from __future__ import annotations

import re
from importlib import resources

import asyncpg

from cloud_ingest.schema import migrate, views
from tests.support import PgCluster

_LATEST = max(
    int(entry.name[:3])
    for entry in resources.files("cloud_ingest").joinpath("migrations").iterdir()
    if re.match(r"^\d{3}_", entry.name)
)

# What makes two schemas the same here: views' definitions, columns, indexes,
# constraints, functions, triggers, relations and sequences of the public schema.
_SCHEMA = {
    "views": "SELECT viewname, definition FROM pg_views WHERE schemaname = 'public'",
    "columns": "SELECT table_name, column_name, ordinal_position, data_type, column_default,"
               " is_nullable FROM information_schema.columns WHERE table_schema = 'public'",
    "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes"
               " WHERE schemaname = 'public'",
    "constraints": "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)"
                   " FROM pg_constraint WHERE connamespace = 'public'::regnamespace",
    "functions": "SELECT proname, pg_get_functiondef(oid) FROM pg_proc"
                 " WHERE pronamespace = 'public'::regnamespace",
    "triggers": "SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid)"
                " FROM pg_trigger WHERE NOT tgisinternal",
    "relations": "SELECT relname, relkind::text FROM pg_class"
                 " WHERE relnamespace = 'public'::regnamespace",
    "sequences": "SELECT sequencename, data_type::text FROM pg_sequences"
                 " WHERE schemaname = 'public'",
}


async def _schema(conn: asyncpg.Connection) -> dict[str, list[tuple[str, ...]]]:
    return {what: sorted(tuple(map(str, row)) for row in await conn.fetch(query))
            for what, query in _SCHEMA.items()}


async def _views_present(conn: asyncpg.Connection) -> set[str]:
    return {r[0] for r in await conn.fetch(
        "SELECT viewname FROM pg_views WHERE schemaname = 'public'")}


def test_views_file_defines_each_view_once_and_no_migration_defines_one() -> None:
    """Every view of views.sql is named once and needs a migration that exists; the
    numbered migrations hold no view statement (their home is views.sql)."""
    defined = views()
    assert len({v.name for v in defined}) == len(defined)
    assert all(1 <= v.since <= _LATEST for v in defined)
    for entry in resources.files("cloud_ingest").joinpath("migrations").iterdir():
        if re.match(r"^\d{3}_", entry.name):
            text = entry.read_text(encoding="utf-8")
            assert not re.search(r"^\s*(CREATE|DROP)\b.*\bVIEW\b", text,
                                 re.MULTILINE | re.IGNORECASE), entry.name


async def test_each_version_holds_the_views_its_tables_can_and_the_end_is_the_same(
    pg_cluster: PgCluster,
) -> None:
    """Migrated one version at a time, a database holds after each exactly the views
    whose final form its tables can carry, and ends with the same schema as one migrated
    at once; a second run applies nothing and leaves the views as they are."""
    async with pg_cluster.fresh_database() as stepwise_dsn, \
            pg_cluster.fresh_database() as at_once_dsn:
        stepwise = await asyncpg.connect(stepwise_dsn)
        at_once = await asyncpg.connect(at_once_dsn)
        try:
            for version in range(1, _LATEST + 1):
                assert await migrate(stepwise, upto=version) == [version]
                assert await _views_present(stepwise) == {
                    v.name for v in views() if v.since <= version}
            assert await migrate(at_once) == list(range(1, _LATEST + 1))
            assert await migrate(at_once) == []
            assert await _views_present(at_once) == {v.name for v in views()}
            assert await _schema(stepwise) == await _schema(at_once)
        finally:
            await stepwise.close()
            await at_once.close()
