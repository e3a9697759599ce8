"""``edgesync tail``: print records as they commit, straight from PostgreSQL.

It follows the commit-ordered feed (:mod:`broker.feed`) from ``--from`` (default:
now), waking on LISTEN/NOTIFY. Output is NDJSON (one record per line, each with the
``cursor`` to resume after it) unless standard output is a terminal, where each
batch is a table. Stateless: it stores no checkpoint (use a named
:class:`~broker.feed.Subscription` for that).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from broker.cli.database import Dsn, StateDir, exit_when_unavailable, resolve_dsn
from broker.cli.output import stderr_console, stdout_console
from broker.errors import EdgesyncError

if TYPE_CHECKING:
    from broker.feed import FeedRecord

__all__ = ["tail", "tail_cmd"]



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
    import asyncpg  # lazy, like the feed: `edgesync --help` stays fast

    from broker.feed import Filters, follow, parse_start_at, resolve_start

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


def tail_cmd(
    *,
    stream: Annotated[list[str] | None, typer.Option(help="Only this stream (repeatable).")]
    = None,
    edge: Annotated[list[str] | None, typer.Option(help="Only this edge (repeatable).")]
    = None,
    from_: Annotated[str, typer.Option("--from", help="Where to start: latest, earliest, "
                                       "a cursor, a duration ago (15m) or an ISO time.")]
    = "latest",
    follow: Annotated[bool, typer.Option(help="Keep printing as records commit.")] = True,
    limit: Annotated[int | None, typer.Option(min=1, help="Stop after N records.")] = None,
    output: Annotated[str, typer.Option(help="ndjson, table, or auto (a table on a TTY).")]
    = "auto",
    dsn: Dsn = None,
    state_dir: StateDir = Path(".edgesync"),
) -> None:
    """Print records as they commit (NDJSON, or a table on a terminal)."""
    console = stdout_console()
    table = output == "table" or (output == "auto" and console.is_terminal)
    with exit_when_unavailable("read records", dsn=dsn, state_dir=state_dir):
        try:
            asyncio.run(tail(resolve_dsn(dsn, state_dir), console, streams=stream or [],
                             edges=edge or [], start=from_, table=table, follow_feed=follow,
                             limit=limit))
        except KeyboardInterrupt:
            return
        except EdgesyncError as exc:  # on stderr: stdout may be piped into jq
            stderr_console().print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc


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
