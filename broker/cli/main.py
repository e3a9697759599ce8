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
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

import structlog
import typer
from rich.markup import escape

from broker.cli.commands import cmd_app, keys_app
from broker.cli.database import exit_when_unavailable, resolve_dsn
from broker.cli.dead_letters import dead_letters_app
from broker.cli.desired import desired_app, label_edge, rollout_app
from broker.cli.edges import edges_app
from broker.cli.export import export_cmd
from broker.cli.operators import operators_app
from broker.cli.output import stderr_console, stdout_console
from broker.cli.retention import retention_app
from broker.cli.services import (
    EXIT_ERROR,
    INGEST_MALLOC,
    reuse_freed_memory,
    run_from_env,
    run_service,
)
from broker.cli.streams import streams_app
from broker.cli.tail import tail_cmd
from broker.errors import ConfigError
from broker.logs import configure_logging
from broker.settings import Settings

__all__ = [
    "api",
    "app",
    "bench",
    "bridge",
    "console",
    "ingest",
    "main",
    "settings_cmd",
    "status",
    "up",
]

log = structlog.get_logger(__name__)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="edgesync: durable edge-to-cloud sync over NATS JetStream into PostgreSQL.")
console = stdout_console(soft_wrap=True)  # piped (a log file), lines stay whole
_errors = stderr_console()  # errors: never into a pipe's data
app.add_typer(cmd_app, name="cmd")
app.add_typer(keys_app, name="keys")
app.add_typer(dead_letters_app, name="dead-letters")
app.add_typer(edges_app, name="edges")
edges_app.command("label")(label_edge)
app.add_typer(desired_app, name="desired")
app.add_typer(rollout_app, name="rollout")
app.add_typer(streams_app, name="streams")


app.add_typer(operators_app, name="operators")
app.command("tail")(tail_cmd)
app.add_typer(retention_app, name="retention")
app.command("export")(export_cmd)


def _run_from_env(
    body: Callable[[Settings, asyncio.Event], Coroutine[Any, Any, None]],
) -> None:
    """Run a service as :func:`broker.cli.services.run_from_env` does; a non-zero
    outcome becomes the command's exit status (an error of ours is printed too)."""
    _exit_with(*run_from_env(body))


def _exit_with(code: int, error: BaseException | None) -> None:
    if code == EXIT_ERROR and error is not None:
        _errors.print(f"[red]error:[/red] {error}")
    if code:
        raise typer.Exit(code) from error


@app.command()
def up(
    *,
    state_dir: Annotated[Path, typer.Option(help="Where buffers, NATS and Postgres data live.")]
    = Path(".edgesync"),
    edges: Annotated[int, typer.Option(min=1, max=64, help="Simulated edges, each a bridge.")]
    = 1,
    simulate: Annotated[float, typer.Option(
        "--simulate", min=0, help="Synthetic records/s per edge through the SDK (0: off).")] = 0,
    bridge_port: Annotated[int, typer.Option(
        help="First bridge port; the N edges take N ports from it. Taken: an error "
        "(0: free ports).")] = 8787,
    api_port: Annotated[int, typer.Option(
        help="Operator API port. Taken: an error (0: a free port).")] = 8789,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "warning",
    fresh: Annotated[bool, typer.Option(
        "--fresh", help="Wipe the state dir first: database, NATS store, buffers, keys.")]
    = False,
) -> None:
    """Run the whole system on this machine: NATS, PostgreSQL, ingest, bridges.

    State (database, NATS store, buffers, keys) lives in --state-dir and survives
    restarts: a second run continues where the first stopped. --fresh starts over.
    The bridges and the API listen on the ports asked for (8787, 8789 by default), or
    `up` stops before starting anything: pass 0 for free ports."""
    from broker.cli.local_run import LocalRunOptions, run_local

    if ignored := sorted(k for k in os.environ
                         if k.startswith("EDGESYNC_") and k not in _UP_READS):
        # Someone who set EDGESYNC_BRIDGE__PRODUCER_TOKENS expects it enforced: say that
        # it is not, rather than run without it in silence.
        _errors.print(
            f"[yellow]warning:[/yellow] `edgesync up` runs on its embedded defaults and "
            f"ignores {', '.join(ignored)}; to configure a service, run it on its own "
            "(`edgesync bridge`, `edgesync ingest`, `edgesync api`: docs/operations.md)")
    if bridge_port and bridge_port <= api_port < bridge_port + edges:
        _errors.print(f"[red]error:[/red] --api-port {api_port} is one of the {edges} "
                      f"bridges' ports from --bridge-port {bridge_port}: move one of them")
        raise typer.Exit(2)
    _exit_if_taken(bridge_port, edges, "--bridge-port")
    _exit_if_taken(api_port, 1, "--api-port")
    configure_logging(log_level, "console")
    options = LocalRunOptions(state_dir=state_dir, edges=edges, simulate_rate=simulate,
                              bridge_port=bridge_port, api_port=api_port, fresh=fresh)
    _exit_with(*run_service(lambda stop: run_local(options, stop=stop,
                                                   print_line=console.print)))
    # Said once everything it started has stopped (a stop used to end in silence).
    console.print(f"edgesync up stopped; its state is kept in {state_dir}")


_UP_READS = frozenset({"EDGESYNC_PG_TEMPLATE_DIR"})
"""The ``EDGESYNC_*`` variables ``edgesync up`` does read."""


def _exit_if_taken(first: int, count: int, flag: str) -> None:
    """Exit 2, before anything starts, if a port of ``first .. first + count - 1`` cannot
    be bound on loopback; port 0 (free ports) passes.

    Never another port instead: every example points its SDK at 8787, and a second
    `up` that moved silently would leave it writing to the first one."""
    import socket

    if first == 0:
        return
    for port in range(first, first + count):
        try:
            with socket.create_server(("127.0.0.1", port)):
                pass
        except OSError as exc:
            _errors.print(f"[red]error:[/red] port {port} ({flag} {first}) is not free "
                          f"({exc.strerror or exc}); another `edgesync up` may hold it: stop "
                          f"it, pass {flag} with another port, or {flag} 0 for a free one")
            raise typer.Exit(2) from exc


@app.command()
def bridge() -> None:
    """Run one edge bridge (settings from EDGESYNC_BRIDGE__*, EDGESYNC_NATS__*)."""
    from edge_bridge.bridge import Bridge

    _run_from_env(lambda settings, stop: Bridge(settings.bridge, settings.nats).run(stop))


@app.command()
def ingest() -> None:
    """Run one ingest process (settings from EDGESYNC_INGEST__*, EDGESYNC_NATS__*)."""
    from cloud_ingest.service import Ingest

    reuse_freed_memory(INGEST_MALLOC)  # this process is the ingest alone
    _run_from_env(lambda settings, stop: Ingest(settings.ingest, settings.nats).run(stop))


@app.command()
def api() -> None:
    """Run the operator API (settings from EDGESYNC_API__*, EDGESYNC_NATS__*)."""
    from cloud_ingest.api import Api

    _run_from_env(lambda settings, stop: Api(settings.api, settings.nats).run(stop))


@app.command()
def status(
    dsn: Annotated[str | None, typer.Option(help="PostgreSQL DSN (default: runtime.json, "
                                                   "then EDGESYNC_INGEST__POSTGRES_DSN).")] = None,
    state_dir: Annotated[Path, typer.Option(help="Where `edgesync up` wrote runtime.json.")]
    = Path(".edgesync"),
    gaps: Annotated[bool, typer.Option(
        "--gaps", help="Completeness per edge/stream/epoch: committed, dropped, "
        "dead-lettered, lost after commit, missing.")]
    = False,
    limit: Annotated[int, typer.Option(
        min=0, help="Rows per table, those that need attention first (offline edges, "
        "largest backlogs, missing records); 0 lists every row.")] = 50,
) -> None:
    """Print a fleet summary, then edges, their backlog, and committed counts per stream."""
    from broker.cli.status import show_status
    from broker.settings import ApiSettings

    offline_after_s = ApiSettings.model_fields["edge_offline_after_s"].default
    with exit_when_unavailable("read status", dsn=dsn, state_dir=state_dir):
        asyncio.run(show_status(resolve_dsn(dsn, state_dir), console, gaps=gaps, limit=limit,
                                offline_after_s=offline_after_s))


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
        _errors.print(f"[red]{write_docs} has no {BEGIN} ... {END} markers[/red]")
        raise typer.Exit(2) from exc
    write_docs.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")


def main() -> None:
    """The ``edgesync`` command. Every command logs warnings and errors to stderr, nothing
    else: a command's own output is its standard output, and library lines (an info line
    per write, asyncio's TLS notes) must not mix into it. A service or `up` sets its own
    level on top."""
    configure_logging("warning", "console")
    try:
        app()
    except ConfigError as exc:  # e.g. an invalid EDGESYNC_* setting: one line, status 2
        _errors.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(2)
