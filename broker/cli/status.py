"""``edgesync status``: edges, their backlog, and per stream what is committed, read
straight from PostgreSQL (the ``edges`` table and the ``v_completeness`` view).

Made for fleets: a summary line counts every edge and stream, and the tables list
the rows that need attention first (offline edges, then the largest backlogs;
streams with missing records, then the largest lag), ``limit`` rows each, so ten
thousand edges print a screen, not ten thousand lines."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from broker.pg_connecting import connected

__all__ = ["show_status"]

_SUMMARY = """
SELECT count(*) AS edges,
       count(*) FILTER (WHERE last_seen <= now() - make_interval(secs => $1)) AS offline,
       coalesce(sum(unshipped_records), 0) AS unshipped
FROM edges
"""
_EDGES = """
SELECT edge_id, version, last_seen, now() - last_seen AS ago, unshipped_records,
       buffer_records, buffer_bytes, oldest_unshipped_age_s, dropped,
       last_seen <= now() - make_interval(secs => $1) AS offline
FROM edges
ORDER BY offline DESC, unshipped_records DESC, edge_id
LIMIT $2
"""
_STREAMS_SUMMARY = """
SELECT count(*) AS streams, count(*) FILTER (WHERE missing_records > 0) AS with_missing,
       coalesce(sum(committed_records), 0) AS committed,
       coalesce(sum(missing_records), 0) AS missing
FROM v_completeness
"""
_PROGRESS = """
SELECT * FROM v_completeness
ORDER BY missing_records DESC, lag_seconds DESC NULLS LAST, edge_id, stream, epoch
LIMIT $1
"""
_ALL = 2**62
"""``limit`` 0 means every row."""


async def show_status(dsn: str, console: Console, *, gaps: bool = False, limit: int = 50,
                      offline_after_s: float = 30.0) -> None:
    """Print a summary of the fleet, then the edges and, per edge/stream/epoch, what is
    committed: the ``limit`` rows that need attention most (0: every row).

    Args:
        gaps: also the completeness columns (dropped, dead-lettered, lost after commit,
            missing, missing ranges, lag).
        offline_after_s: an edge silent for this long counts as offline (the API's
            ``edge_offline_after_s``).

    Raises:
        OSError, asyncpg.PostgresError: the database cannot be read.
    """
    rows = limit or _ALL
    async with connected(dsn) as conn:
        fleet = await conn.fetchrow(_SUMMARY, offline_after_s)
        edges = await conn.fetch(_EDGES, offline_after_s, rows)
        streams = await conn.fetchrow(_STREAMS_SUMMARY)
        progress = await conn.fetch(_PROGRESS, rows)
    assert fleet is not None and streams is not None  # aggregates always return a row
    console.print(
        f"{fleet['edges']:,} edges: {fleet['edges'] - fleet['offline']:,} online, "
        f"{fleet['offline']:,} offline (silent > {offline_after_s:g}s), "
        f"{fleet['unshipped']:,} records unshipped; {streams['streams']:,} edge streams: "
        f"{streams['committed']:,} records committed, {streams['missing']:,} missing in "
        f"{streams['with_missing']:,} of them")
    table = Table(title="edges")
    for col in ("edge", "version", "last seen", "unshipped", "buffered", "buffer bytes",
                "oldest unshipped", "dropped (overflow/ttl)"):
        table.add_column(col)
    for e in edges:
        seen = f"{e['ago'].total_seconds():.0f}s ago" + (" (offline)" if e["offline"] else "")
        table.add_row(
            e["edge_id"], e["version"], seen,
            f"{e['unshipped_records']:,}", f"{e['buffer_records']:,}",
            f"{e['buffer_bytes']:,}", f"{e['oldest_unshipped_age_s']:.1f}s",
            _drop_counts(e["dropped"]),
        )
    console.print(table)
    _more(console, fleet["edges"] - len(edges), "edges")
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
    _more(console, streams["streams"] - len(progress), "edge streams")


def _more(console: Console, hidden: int, what: str) -> None:
    if hidden > 0:
        console.print(f"… {hidden:,} more {what} (--limit 0 lists every row)")


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
