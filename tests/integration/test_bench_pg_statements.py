"""``python -m bench --pg-statements``: a PostgreSQL started with the bench's preload
keeps the statement times of a measured window, and they print as a table. Nothing
is kept when the flag is off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from bench.pg_statements import PRELOAD, statement_tables, statement_times
from bench.results import ScenarioResult
from broker.pg_connecting import connected
from broker.runtime.embedded_postgres import EmbeddedPostgres


async def test_a_window_keeps_its_statements_and_prints_them(tmp_path: Path) -> None:
    async with (EmbeddedPostgres(tmp_path / "pg", settings=PRELOAD, superuser=True) as pg,
                connected(pg.dsn) as conn):
        await conn.execute("CREATE TABLE t (n int)")
        await conn.execute("INSERT INTO t SELECT 1")  # before the window: not kept
        res = ScenarioResult("k", "9. test")
        async with statement_times(pg.dsn, res.data, "drain"):
            for _ in range(3):
                await conn.execute("INSERT INTO t SELECT generate_series(1, 100)")
    kept = res.data["pg_statements"]["drain"]
    inserts = [r for r in kept if r["query"].startswith("INSERT INTO t")]
    assert len(inserts) == 1 and inserts[0]["calls"] == 3 and inserts[0]["rows"] == 300
    assert not any("pg_stat_statements" in r["query"] for r in kept)
    console = Console(width=200, record=True)
    for table in statement_tables([res]):
        console.print(table)
    text = console.export_text()
    assert "PostgreSQL statements: 9. test, drain" in text and "INSERT INTO t" in text


async def test_without_the_flag_nothing_is_kept() -> None:
    data: dict[str, Any] = {}
    async with statement_times(None, data, "drain"):
        pass
    assert data == {}
    assert statement_tables([ScenarioResult("k", "9. test")]) == []
