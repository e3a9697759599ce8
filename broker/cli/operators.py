"""``edgesync operators add|list|revoke``: who may use the operator API, with which
scopes (``read``, ``consume``, ``operate``, ``operate:<kind>``, ``admin``).

Talks to PostgreSQL directly (like ``status``): whoever holds the database's
credentials administers operators, with no API token needed to make the first
one. Each change is written to the audit log as ``cli:<user>@<host>``. The token
``add`` prints is shown once; only its SHA-256 is kept.
Exit codes: 0 done, 1 refused (the reason is printed), 2 cannot connect.
"""

from __future__ import annotations

import getpass
import json
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from broker.cli.database import Dsn, StateDir, run_on_database
from broker.cli.output import stdout_console

__all__ = ["add", "console", "list_", "operators_app", "revoke"]

console = stdout_console()
operators_app = typer.Typer(
    no_args_is_help=True, help="Operator tokens and scopes for the operator API.")
T = TypeVar("T")



def _who() -> str:
    return f"cli:{getpass.getuser()}@{socket.gethostname()}"


def _run(dsn: str | None, state_dir: Path, job: Callable[[Any], Awaitable[T]]) -> T:
    # Operators may come before the API's first start: the schema is applied first.
    return run_on_database(dsn, state_dir, job, doing="reach the database",
                           migrate=True)



@operators_app.command()
def add(
    name: Annotated[str, typer.Argument(help="Operator name (a person or a system).")],
    scope: Annotated[list[str], typer.Option(
        "--scope", "-s", help="read, consume, operate, operate:<kind> or admin; repeatable.")],
    token_stdin: Annotated[bool, typer.Option(
        "--token-stdin", help="Read the token from stdin instead of minting one (it must "
        "be strong: >= 24 characters, ~80 bits).")] = False,
    dsn: Dsn = None,
    state_dir: StateDir = Path(".edgesync"),
) -> None:
    """Create an operator and print its token (once: only its hash is stored)."""
    from cloud_ingest.operators import add_operator

    given = sys.stdin.readline().strip() if token_stdin else None
    token = _run(dsn, state_dir, lambda conn: add_operator(
        conn, name, scope, created_by=_who(), token=given))
    if given is None:
        typer.echo(token)
    typer.echo(f"operator {name!r} added ({', '.join(sorted(set(scope)))}); the token is "
               "shown only now", err=True)


@operators_app.command("list")
def list_(
    revoked: Annotated[bool, typer.Option("--revoked", help="Include revoked ones.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    dsn: Dsn = None,
    state_dir: StateDir = Path(".edgesync"),
) -> None:
    """Operators, their scopes, and their tokens' first characters."""
    from cloud_ingest.operators import list_operators

    rows = _run(dsn, state_dir, lambda conn: list_operators(conn, include_revoked=revoked))
    if as_json:
        typer.echo(json.dumps(rows, default=str, indent=2))
        return
    table = Table(title="operators")
    for col in ("name", "scopes", "token", "created", "by", "last used", "revoked"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], ", ".join(r["scopes"]), f"{r['token_prefix']}…",
                      f"{r['created_at']:%Y-%m-%d %H:%M}", r["created_by"],
                      "-" if r["last_used_at"] is None else f"{r['last_used_at']:%Y-%m-%d %H:%M}",
                      "-" if r["revoked_at"] is None else f"{r['revoked_at']:%Y-%m-%d %H:%M}")
    console.print(table)


@operators_app.command()
def revoke(
    name: Annotated[str, typer.Argument(help="The operator to cut off.")],
    dsn: Dsn = None,
    state_dir: StateDir = Path(".edgesync"),
) -> None:
    """Revoke an operator's token: the API refuses it from the next request on."""
    from cloud_ingest.operators import revoke_operator

    _run(dsn, state_dir, lambda conn: revoke_operator(conn, name, revoked_by=_who()))
    typer.echo(f"operator {name!r} revoked")
