"""Where PostgreSQL's time goes in a measured window (``--pg-statements``).

With the flag, the bench's PostgreSQL preloads ``pg_stat_statements`` and the ingest
drains (scenarios ``ingest`` and ``fleet``) wrap their measured window in
:func:`statement_times`: the statistics are reset when it starts and, when it ends,
the statements that took most of the server's time are kept in the results
(``pg_statements``, per window) and printed. A statement's time is its execution time
as the server counts it: for a COPY that includes waiting for the client's rows.
It is how the fan-in drain's merge, stream-key and COPY costs were told apart
(bench/README.md, 3 Dec 2026).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from rich.table import Table

from bench.results import ScenarioResult
from broker.pg_connecting import connected

__all__ = ["PRELOAD", "TOP", "statement_tables", "statement_times"]

PRELOAD = {"shared_preload_libraries": "pg_stat_statements",
           "pg_stat_statements.track": "all"}
"""The server settings the flag adds (``track = all``: statements inside functions too)."""
TOP = 12
"""Statements kept per window, by total execution time."""


@contextlib.asynccontextmanager
async def statement_times(dsn: str | None, data: dict[str, Any], name: str
                          ) -> AsyncIterator[None]:
    """Reset the statement statistics, run the body, then put the top :data:`TOP`
    statements of the window into ``data["pg_statements"][name]`` (``data``: a
    scenario's results data). ``dsn`` None (the flag is off):
    nothing is done. The extension is created in the database ``dsn`` names (the
    statistics themselves are the whole server's)."""
    if dsn is None:
        yield
        return
    async with connected(dsn) as conn:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute("SELECT pg_stat_statements_reset()")
        yield
        rows = await conn.fetch(
            "SELECT calls, total_exec_time AS ms, rows, "
            "left(regexp_replace(query, '\\s+', ' ', 'g'), 160) AS query "
            "FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat_statements%' "
            "ORDER BY total_exec_time DESC LIMIT $1", TOP)
    data.setdefault("pg_statements", {})[name] = [
        {"calls": r["calls"], "ms": round(r["ms"], 1), "rows": r["rows"], "query": r["query"]}
        for r in rows]


def statement_tables(results: list[ScenarioResult]) -> list[Table]:
    """A table per measured window that kept statement times."""
    tables = []
    for res in results:
        for window, rows in res.data.get("pg_statements", {}).items():
            table = Table(title=f"PostgreSQL statements: {res.title}, {window}")
            for column in ("ms", "calls", "rows", "statement"):
                table.add_column(column, justify="left" if column == "statement" else "right")
            for r in rows:
                table.add_row(f"{r['ms']:,.0f}", f"{r['calls']:,}", f"{r['rows']:,}",
                              r["query"])
            tables.append(table)
    return tables
