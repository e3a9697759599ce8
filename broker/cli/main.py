"""The ``edgesync`` command line.

``edgesync up`` runs everything locally; ``bridge``, ``ingest`` and ``api`` run one
service against external NATS/PostgreSQL from ``EDGESYNC_*`` settings;
``status`` reads edges, backlog and committed counts from PostgreSQL; ``cmd``
sends control commands through the API and ``keys`` makes their signing keys
(:mod:`broker.cli.commands`); ``streams init|check`` creates or checks the JetStream
topology the cloud owns (:mod:`broker.cli.streams`).
Service imports are lazy so ``edgesync --help`` stays fast.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from broker.cli.commands import cmd_app, keys_app
from broker.cli.streams import streams_app
from broker.errors import EdgesyncError
from broker.logs import configure_logging
from broker.settings import Settings

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="edgesync: durable edge-to-cloud sync over NATS JetStream into PostgreSQL.")
console = Console()
app.add_typer(cmd_app, name="cmd")
app.add_typer(keys_app, name="keys")
app.add_typer(streams_app, name="streams")


def _run_service(body: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run ``body(stop)`` with SIGINT/SIGTERM setting ``stop``."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await body(stop)

    try:
        asyncio.run(main())
    except EdgesyncError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


@app.command()
def up(
    *,
    state_dir: Annotated[Path, typer.Option(help="Where buffers, NATS and Postgres data live.")]
    = Path(".edgesync"),
    edges: Annotated[int, typer.Option(min=1, max=64, help="Simulated edges, each a bridge.")]
    = 1,
    simulate: Annotated[float, typer.Option(
        "--simulate", min=0, help="Synthetic records/s per edge through the SDK (0: off).")] = 0,
    bridge_port: Annotated[int, typer.Option(help="First bridge port (0: free ports).")] = 8787,
    api_port: Annotated[int, typer.Option(help="Operator API port (0: a free port).")] = 8789,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "warning",
    fresh: Annotated[bool, typer.Option(
        "--fresh", help="Wipe the state dir first: database, NATS store, buffers, keys.")]
    = False,
) -> None:
    """Run the whole system on this machine: NATS, PostgreSQL, ingest, bridges.

    State (database, NATS store, buffers, keys) lives in --state-dir and survives
    restarts: a second run continues where the first stopped. --fresh starts over."""
    from broker.cli.local_run import LocalRunOptions, run_local

    configure_logging(log_level, "console")
    options = LocalRunOptions(state_dir=state_dir, edges=edges, simulate_rate=simulate,
                              bridge_port=_free_or(bridge_port), api_port=_free_or(api_port),
                              fresh=fresh)
    _run_service(lambda stop: run_local(options, stop=stop, print_line=console.print))


def _free_or(port: int) -> int:
    """``port`` if it can be bound on loopback, else 0 (pick a free one)."""
    import socket

    if port == 0:
        return 0
    try:
        with socket.create_server(("127.0.0.1", port)):
            return port
    except OSError:
        return 0


@app.command()
def bridge() -> None:
    """Run one edge bridge (settings from EDGESYNC_BRIDGE__*, EDGESYNC_NATS__*)."""
    from edge_bridge.bridge import run

    settings = Settings()
    configure_logging(settings.log.level, settings.log.format)
    _run_service(lambda stop: run(settings.bridge, settings.nats, stop=stop))


@app.command()
def ingest() -> None:
    """Run one ingest process (settings from EDGESYNC_INGEST__*, EDGESYNC_NATS__*)."""
    from cloud_ingest.service import run

    settings = Settings()
    configure_logging(settings.log.level, settings.log.format)
    _run_service(lambda stop: run(settings.ingest, settings.nats, stop=stop))


@app.command()
def api() -> None:
    """Run the operator API (settings from EDGESYNC_API__*, EDGESYNC_NATS__*)."""
    from cloud_ingest.api import run

    settings = Settings()
    configure_logging(settings.log.level, settings.log.format)
    _run_service(lambda stop: run(settings.api, settings.nats, stop=stop))


def _dsn(dsn: str | None, state_dir: Path) -> str:
    if dsn:
        return dsn
    runtime = state_dir / "runtime.json"
    if runtime.exists():
        return str(json.loads(runtime.read_text())["postgres_dsn"])
    return Settings().ingest.postgres_dsn


@app.command()
def status(
    dsn: Annotated[str | None, typer.Option(help="PostgreSQL DSN (default: runtime.json, "
                                                   "then EDGESYNC_INGEST__POSTGRES_DSN).")] = None,
    state_dir: Annotated[Path, typer.Option(help="Where `edgesync up` wrote runtime.json.")]
    = Path(".edgesync"),
    gaps: Annotated[bool, typer.Option(
        "--gaps", help="Completeness per edge/stream/epoch: committed, dropped, "
                  "lost after commit, missing.")]
    = False,
) -> None:
    """Print edges, their backlog, and committed counts per stream."""
    import asyncpg

    async def show() -> None:
        conn = await asyncpg.connect(_dsn(dsn, state_dir))
        try:
            edges = await conn.fetch(
                "SELECT edge_id, version, last_seen, now() - last_seen AS ago, "
                "unshipped_records, buffer_records, buffer_bytes, oldest_unshipped_age_s, "
                "dropped FROM edges ORDER BY edge_id"
            )
            progress = await conn.fetch(
                "SELECT * FROM v_completeness ORDER BY edge_id, stream, epoch"
            )
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
            columns += ["dropped (overflow/ttl)", "lost after commit", "missing",
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
                    _lost(p),
                    f"{p['missing_records']:,}",
                    _ranges(p["missing_ranges"]),
                    "-" if lag is None else f"{lag:.1f}s",
                ]
            table.add_row(*row)
        console.print(table)

    try:
        asyncio.run(show())
    except (OSError, asyncpg.PostgresError) as exc:
        console.print(f"[red]cannot read status:[/red] {exc}")
        raise typer.Exit(2) from exc


def _drop_counts(dropped: Any) -> str:
    """``overflow/ttl`` totals over an edge's streams, from the heartbeat's JSON."""
    per_stream = json.loads(dropped) if isinstance(dropped, str | bytes) else dropped
    overflow = sum(int(v.get("overflow", 0)) for v in per_stream.values())
    ttl = sum(int(v.get("ttl", 0)) for v in per_stream.values())
    return f"{overflow:,}/{ttl:,}"


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


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench(ctx: typer.Context) -> None:
    """Run the benchmarks beside their baselines (options: `edgesync bench --help`)."""
    from bench.cli import main as bench_main  # lazy: bench/ is a development tool

    raise typer.Exit(bench_main(ctx.args))


@app.command("settings")
def settings_cmd(
    write_docs: Annotated[Path | None, typer.Option(
        "--write-docs", help="Rewrite the reference inside this Markdown file "
                             "(docs/operations.md) instead of printing it.")] = None,
) -> None:
    """Print every EDGESYNC_* setting with its default and meaning."""
    from broker.cli.settings_reference import BEGIN, END, settings_reference

    table = settings_reference()
    if write_docs is None:
        typer.echo(table, nl=False)
        return
    text = write_docs.read_text()
    try:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
    except ValueError as exc:
        console.print(f"[red]{write_docs} has no {BEGIN} ... {END} markers[/red]")
        raise typer.Exit(2) from exc
    write_docs.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")


def main() -> None:
    app()
