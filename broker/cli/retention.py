"""``edgesync retention set|unset|list|apply``: how long each stream's records are kept.

Talks to PostgreSQL directly (like ``dead-letters``), through
:mod:`cloud_ingest.retention`. The ingest enforces the settings on its own every
``maintenance_interval_s``; ``apply`` runs a round now. Exit codes: 0 done, 1 bad
input (the reason is printed), 2 cannot connect or the schema is not there yet.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from broker.cli.database import Dsn, StateDir, run_on_database
from broker.cli.output import stderr_console, stdout_console
from broker.errors import InvalidInput

__all__ = ["StreamArg", "apply", "console", "list_", "retention_app", "set_", "unset"]

console = stdout_console()
_errors = stderr_console()  # errors: never into the data
retention_app = typer.Typer(
    no_args_is_help=True,
    help="How long each stream's records are kept (whole day partitions are dropped).")
T = TypeVar("T")

StreamArg = Annotated[str, typer.Argument(help="A stream name, or '*' for the default of "
                                            "streams without a setting of their own.")]


def _run(dsn: str | None, state_dir: Path, job: Callable[[Any], Awaitable[T]]) -> T:
    return run_on_database(dsn, state_dir, job, doing="reach PostgreSQL")


@retention_app.command("set")
def set_(stream: StreamArg, keep: Annotated[str, typer.Argument(help="12h, 30d, 2w ...")], *,
         dsn: Dsn = None, state_dir: StateDir = Path(".edgesync")) -> None:
    """Keep STREAM's records for KEEP (at least 1h); they go with their day partition
    once every stream in it is past its retention."""
    from cloud_ingest.retention import format_keep, parse_keep, set_retention

    try:
        duration = parse_keep(keep)
    except InvalidInput as exc:
        _errors.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from exc
    async def job(conn: Any) -> bool:
        await set_retention(conn, stream, duration)
        return stream == "*" or bool(await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM stream_keys WHERE stream = $1)", stream))

    known = _run(dsn, state_dir, job)
    console.print(f"{stream}: kept {format_keep(duration)}")
    if not known:
        console.print(f"[yellow]note:[/yellow] no records of a stream {stream!r} yet (a typo?);"
                      " the setting applies once some arrive")


@retention_app.command()
def unset(stream: StreamArg, *, dsn: Dsn = None,
          state_dir: StateDir = Path(".edgesync")) -> None:
    """Remove STREAM's setting (it falls back to '*', or is kept forever)."""
    from cloud_ingest.retention import set_retention

    _run(dsn, state_dir, lambda conn: set_retention(conn, stream, None))
    console.print(f"{stream}: no retention of its own")


@retention_app.command("list")
def list_(*, dsn: Dsn = None, state_dir: StateDir = Path(".edgesync"),
          as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The settings, and the day partitions of records with their size."""
    from cloud_ingest.partitioning import list_partitions
    from cloud_ingest.retention import format_keep, retention_settings

    async def job(conn: Any) -> tuple[dict[str, str], list[dict[str, Any]]]:
        settings = {s: format_keep(k) for s, k in (await retention_settings(conn)).items()}
        parts = []
        for p in await list_partitions(conn):
            row = await conn.fetchrow(
                "SELECT pg_total_relation_size(c.oid) AS bytes, "
                "greatest(c.reltuples, 0)::int8 AS rows_estimate "
                "FROM pg_class c WHERE c.relname = $1", p.name)
            parts.append({"partition": p.name, "day": p.day.isoformat(),
                          "bytes": row["bytes"], "rows_estimate": row["rows_estimate"]})
        return settings, parts

    settings, parts = _run(dsn, state_dir, job)
    if as_json:
        typer.echo(json.dumps({"retention": settings, "partitions": parts}, indent=2))
        return
    table = Table(title="retention")
    table.add_column("stream")
    table.add_column("kept")
    for stream, keep in sorted(settings.items()):
        table.add_row(stream, keep)
    if not settings:
        table.add_row("(none)", "forever")
    console.print(table)
    ptable = Table(title="records partitions")
    for col in ("partition", "day", "MB", "rows (estimate)"):
        ptable.add_column(col)
    for p in parts:
        ptable.add_row(p["partition"], p["day"], f"{p['bytes'] / 1e6:.1f}",
                       str(p["rows_estimate"]))
    console.print(ptable)


@retention_app.command()
def apply(*, dsn: Dsn = None, state_dir: StateDir = Path(".edgesync"),
          ahead_days: Annotated[int, typer.Option(min=1, max=60, help=(
              "Days of partitions to have ready ahead of today."))] = 3) -> None:
    """One round of upkeep now (the ingest does it every maintenance_interval_s):
    create partitions ahead, drop those whose streams are all past retention."""
    from cloud_ingest.maintenance import maintain_once

    created, report = _run(dsn, state_dir, lambda conn: maintain_once(conn, ahead_days))
    for name in created:
        console.print(f"created {name}")
    for r in report.retired:
        console.print(f"dropped {r.partition}: {r.rows} rows retired "
                      f"({', '.join(r.streams) or 'empty'})")
    for name, why in report.kept.items():
        console.print(f"kept {name}: {why}")
    if report.skipped:
        console.print("another process is enforcing retention right now; nothing done")
    elif not (created or report.retired or report.kept):
        console.print(f"nothing to do: partitions are ready {ahead_days} days ahead and "
                      "none is past its streams' retention")
