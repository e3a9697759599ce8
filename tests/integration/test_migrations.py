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


async def test_es_watermark_of_012_is_002s_number_without_its_executor(
    pg_cluster: PgCluster,
) -> None:
    """Migration 012's es_watermark gives 002's number for every multirange of seqs
    >= 1 (and NULL, empty, a gap at 1), and is inlined: no SQL-function call per row."""
    async with pg_cluster.fresh_database() as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn, upto=11)
            old = await conn.fetch(_WATERMARK_CASES)
            assert await migrate(conn, upto=12) == [12]
            assert await conn.fetch(_WATERMARK_CASES) == old
            assert [r["w"] for r in old[:6]] == [0, 0, 0, 4, 7, 9]
            plan = "\n".join(r[0] for r in await conn.fetch(
                "EXPLAIN VERBOSE SELECT es_watermark(ranges + dropped) FROM committed_ranges"))
            assert "es_watermark" not in plan and "lower(" in plan, plan
        finally:
            await conn.close()


_WATERMARK_CASES = """
    SELECT w FROM (
        SELECT i, es_watermark(m) AS w FROM unnest(ARRAY[
            NULL, '{}', '{[2,5)}', '{[1,5),[6,8)}', '{[1,5),[5,8)}', '{[1,10),[12,13),[20,30)}'
        ]::int8multirange[]) WITH ORDINALITY AS u(m, i)
        UNION ALL
        SELECT 100 + k, es_watermark(range_agg(int8range(lo, lo + len)))
        FROM (SELECT g % 97 AS k, 1 + (g * 7919) % 50 AS lo, 1 + g % 9 AS len
              FROM generate_series(1, 5000) g) s GROUP BY k
    ) t ORDER BY i
"""
