"""``edgesync status``: edges, their backlog, and per stream what is committed, read
straight from PostgreSQL (the ``edges`` table and the ``v_completeness`` view)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
from rich.console import Console
from rich.table import Table

__all__ = ["show_status"]

_EDGES = (
    "SELECT edge_id, version, last_seen, now() - last_seen AS ago, "
    "unshipped_records, buffer_records, buffer_bytes, oldest_unshipped_age_s, "
    "dropped FROM edges ORDER BY edge_id"
)
_PROGRESS = "SELECT * FROM v_completeness ORDER BY edge_id, stream, epoch"


async def show_status(dsn: str, console: Console, *, gaps: bool = False) -> None:
    """Print the ``edges`` table and, per edge/stream/epoch, what is committed.

    Args:
        gaps: also the completeness columns (dropped, dead-lettered, lost after commit,
            missing, missing ranges, lag).

    Raises:
        OSError, asyncpg.PostgresError: the database cannot be read.
    """
    conn = await asyncpg.connect(dsn)
    try:
        edges = await conn.fetch(_EDGES)
        progress = await conn.fetch(_PROGRESS)
    finally:
        await conn.close()
    table = Table(title="edges")
    for col in ("edge", "version", "last seen", "unshipped", "buffered", "buffer bytes",
                "oldest unshipped", "dropped (overflow/ttl)"):
        table.add_column(col)
    for e in edges:
        table.add_row(
            e["edge_id"], e["version"], f"{e['ago'].total_seconds():.0f}s ago",
            f"{e['unshipped_records']:,}", f"{e['buffer_records']:,}",
            f"{e['buffer_bytes']:,}", f"{e['oldest_unshipped_age_s']:.1f}s",
            _drop_counts(e["dropped"]),
        )
    console.print(table)
    table = Table(title="completeness" if gaps else "committed")
    columns = ["edge", "stream", "epoch", "committed", "watermark", "highest seq"]
    if gaps:
        columns += ["dropped (overflow/ttl)", "dead-lettered", "lost after commit", "missing",
                    "missing ranges", "lag"]
    for col in columns:
        table.add_column(col)
    for p in progress:
        row = [p["edge_id"], p["stream"], str(p["epoch"]),
               f"{p['committed_records']:,}", f"{p['watermark']:,}",
               f"{p['highest_seq']:,}"]
        if gaps:
            lag = p["lag_seconds"]
            row += [
                f"{p['dropped_records']:,} ({p['dropped_overflow']:,}/{p['dropped_ttl']:,})",
                _dead_lettered(p["dead_lettered_records"], p["dead_lettered_ranges"]),
                _lost(p),
                f"{p['missing_records']:,}",
                _ranges(p["missing_ranges"]),
                "-" if lag is None else f"{lag:.1f}s",
            ]
        table.add_row(*row)
    console.print(table)


def _drop_counts(dropped: Any) -> str:
    """``overflow/ttl`` totals over an edge's streams, from the heartbeat's JSON."""
    per_stream = json.loads(dropped) if isinstance(dropped, str | bytes) else dropped
    overflow = sum(int(v.get("overflow", 0)) for v in per_stream.values())
    ttl = sum(int(v.get("ttl", 0)) for v in per_stream.values())
    return f"{overflow:,}/{ttl:,}"


def _dead_lettered(count: int, ranges: Any) -> str:
    """``3 [7-8, 12-12]``: see them with `edgesync dead-letters list`."""
    return "0" if not count else f"{count:,} [{_ranges(ranges, limit=3)}]"


def _lost(row: Any) -> str:
    """``count [ranges]`` of seqs lost after commit (the cloud had them, then not)."""
    count = row["lost_after_commit_records"]
    return f"{count:,} [{_ranges(row['lost_after_commit_ranges'], 3)}]" if count else "0"


def _ranges(ranges: Any, limit: int = 5) -> str:
    """``[1-10, 20-25, …]`` from an asyncpg multirange (closed bounds, people's notation)."""
    spans = [f"{r.lower}-{r.upper - 1}" for r in ranges]
    if not spans:
        return "-"
    more = f", … ({len(spans) - limit} more)" if len(spans) > limit else ""
    return ", ".join(spans[:limit]) + more
