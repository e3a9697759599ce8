"""``edgesync dead-letters list|show|replay``: what the cloud could not store, and
putting it back once fixed.

Talks to PostgreSQL directly (like ``status``), through the same functions the
operator API's ``/v1/dead-letters`` routes use (:mod:`cloud_ingest.dead_letters`).
Exit codes: 0 done, 1 not replayable (the reason is printed), 2 cannot connect.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from broker.cli.database import Dsn, StateDir, run_on_database
from broker.cli.output import stderr_console, stdout_console

__all__ = [
    "AsJson",
    "console",
    "dead_letters_app",
    "list_",
    "replay",
    "show",
]

console = stdout_console()
_errors = stderr_console()  # errors: never into the data
dead_letters_app = typer.Typer(
    no_args_is_help=True, help="Inspect and replay dead letters (records the cloud refused).")
T = TypeVar("T")

AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _run(dsn: str | None, state_dir: Path, job: Callable[[Any], Awaitable[T]]) -> T:
    return run_on_database(dsn, state_dir, job, doing="read dead letters")



@dead_letters_app.command("list")
def list_(
    *, dsn: Dsn = None, state_dir: StateDir = Path(".edgesync"),
    edge: Annotated[str | None, typer.Option(help="Only this edge.")] = None,
    stream: Annotated[str | None, typer.Option(help="Only this stream.")] = None,
    pending: Annotated[bool, typer.Option(help="Only those not replayed yet.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    as_json: AsJson = False,
) -> None:
    """Dead letters, newest first: identity, reason, replay state."""
    from cloud_ingest.dead_letters import list_dead_letters

    rows = _run(dsn, state_dir, lambda conn: list_dead_letters(
        conn, edge=edge, stream=stream, pending_only=pending, limit=limit))
    if as_json:
        typer.echo(json.dumps(rows, default=str, indent=2))
        return
    table = Table(title="dead letters")
    for col in ("id", "kind", "edge", "stream", "epoch", "seq", "reason", "received",
                "replayed"):
        table.add_column(col)
    for r in rows:
        seqs = "-" if r["seq"] is None else (
            str(r["seq"]) if r["seq"] == r["last_seq"] else f"{r['seq']}-{r['last_seq']}")
        table.add_row(str(r["id"]), r["kind"], r["edge"] or "-", r["stream"] or "-",
                      r["epoch_str"] or "-", seqs, r["reason"][:80],
                      f"{r['received_at']:%Y-%m-%d %H:%M:%S}",
                      "-" if r["replayed_at"] is None else f"{r['replayed_at']:%H:%M:%S}")
    console.print(table)


@dead_letters_app.command()
def show(letter_id: int, *, dsn: Dsn = None, state_dir: StateDir = Path(".edgesync")) -> None:
    """One dead letter: its identity, reason, bytes (base64) and decoded record."""
    from cloud_ingest.dead_letters import get_dead_letter

    found = _run(dsn, state_dir, lambda conn: get_dead_letter(conn, letter_id))
    if found is None:
        _errors.print(f"[red]no dead letter {letter_id}[/red]")
        raise typer.Exit(1)
    found["data_b64"] = base64.b64encode(found.pop("data")).decode()
    typer.echo(json.dumps(found, default=str, indent=2))


@dead_letters_app.command()
def replay(letter_ids: list[int], *, dsn: Dsn = None,
           state_dir: StateDir = Path(".edgesync")) -> None:
    """Write dead-lettered records with their original identity (exactly once), after
    fixing what PostgreSQL objected to."""
    from cloud_ingest.dead_letters import NotReplayable, replay_dead_letter

    async def job(conn: Any) -> int:
        failed = 0
        for letter_id in letter_ids:
            try:
                result = await replay_dead_letter(conn, letter_id)
            except NotReplayable as exc:
                failed += 1
                console.print(f"{letter_id}: [red]{exc.code}[/red] {exc}")
                continue
            state = "already replayed" if result.already_replayed else (
                f"replayed, {result.inserted} record(s) written")
            console.print(f"{letter_id}: {state}")
        return failed

    if _run(dsn, state_dir, job):
        raise typer.Exit(1)
