"""``edgesync tail``: print records as they commit, straight from PostgreSQL.

It follows the commit-ordered feed (:mod:`broker.feed`) from ``--from`` (default:
now), waking on LISTEN/NOTIFY. Output is NDJSON (one record per line, each with the
``cursor`` to resume after it) unless standard output is a terminal, where each
batch is a table. Stateless: it stores no checkpoint (use a named
:class:`~broker.feed.Subscription` for that).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import asyncpg
from rich.console import Console
from rich.table import Table

from broker.feed import FeedRecord, Filters, follow, parse_start_at, resolve_start

__all__ = ["tail"]


async def tail(dsn: str, console: Console, *, streams: Sequence[str], edges: Sequence[str],
               start: str, table: bool, follow_feed: bool = True,
               limit: int | None = None) -> int:
    """Print records after ``start`` (see :func:`broker.feed.parse_start_at`).

    Args:
        table: a rich table per batch instead of NDJSON.
        follow_feed: keep waiting for new commits (else stop once caught up).
        limit: stop after this many records.

    Returns:
        Records printed.

    Raises:
        InvalidInput: a bad ``start``; OSError, asyncpg.PostgresError: no database.
    """
    start_at = parse_start_at(start)
    conn = await asyncpg.connect(dsn)
    printed = 0
    try:
        cursor = await resolve_start(conn, start_at)
        filters = Filters.of(edges=edges, streams=streams)
        async for page in follow(conn, cursor, filters, limit=min(limit or 1000, 1000),
                                 stop_when_caught_up=not follow_feed):
            records = page.records[:limit - printed] if limit is not None else page.records
            if table:
                if records:
                    console.print(_table(records))
            elif records:
                sys.stdout.write("".join(
                    json.dumps(r.to_json(), separators=(",", ":")) + "\n" for r in records))
                sys.stdout.flush()  # a pipe reader sees each batch as it commits
            printed += len(records)
            if limit is not None and printed >= limit:
                break
    finally:
        await conn.close()
    return printed


def _table(records: Sequence[FeedRecord]) -> Table:
    t = Table(show_header=True, header_style="bold", expand=False)
    for col in ("cursor", "edge", "stream", "epoch", "seq", "event time", "key", "payload"):
        t.add_column(col, overflow="fold" if col == "payload" else "ellipsis")
    for r in records:
        payload = r.to_json()["payload"]
        text = payload if isinstance(payload, str) else json.dumps(payload)
        t.add_row(r.cursor, r.edge, r.stream, str(r.epoch), str(r.seq),
                  r.event_time.isoformat(timespec="milliseconds"), r.key or "",
                  text if len(text) <= 120 else text[:117] + "...")
    return t
