"""Where the CLI's direct-to-PostgreSQL commands (``status``, ``dead-letters``,
``operators``, ``retention``) connect, and how they run against it: one connection
per command, and one way of turning what goes wrong into a message and an exit code."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape

from broker.cli.locating import not_located, read_runtime, reason
from broker.cli.output import stderr_console
from broker.errors import ConfigError, EdgesyncError
from broker.settings import load_settings

__all__ = [
    "EXIT_REFUSED",
    "EXIT_UNAVAILABLE",
    "Dsn",
    "StateDir",
    "exit_when_unavailable",
    "resolve_dsn",
    "run_on_database",
]

T = TypeVar("T")

_errors = stderr_console()
"""Where the CLI's errors go: stderr, never into the data a command prints."""

EXIT_REFUSED = 1
"""The command was refused by our rules (bad input, unknown name): retrying will not help."""
EXIT_UNAVAILABLE = 2
"""The database could not be reached or refused the work."""

Dsn = Annotated[str | None, typer.Option(help="PostgreSQL DSN (default: runtime.json, then "
                                               "EDGESYNC_INGEST__POSTGRES_DSN).")]
"""The ``--dsn`` option of the commands that read PostgreSQL directly."""
StateDir = Annotated[Path, typer.Option(help="Where `edgesync up` wrote runtime.json.")]
"""The ``--state-dir`` option: where a running ``edgesync up`` is found."""


def resolve_dsn(dsn: str | None, state_dir: Path) -> str:
    """``--dsn``, else the ``runtime.json`` of ``edgesync up``, else the ingest's setting."""
    if dsn:
        return dsn
    runtime = read_runtime(state_dir)
    if runtime:
        return str(runtime["postgres_dsn"])
    return load_settings().ingest.postgres_dsn  # ConfigError: exit_when_unavailable says it


def _not_located(dsn: str | None, state_dir: Path) -> str | None:
    """Why the DSN may be the wrong one: no ``--dsn``, no ``runtime.json`` and no
    ``EDGESYNC_INGEST__POSTGRES_DSN`` left only the default to try."""
    try:
        given = bool(dsn) or "postgres_dsn" in load_settings().ingest.model_fields_set
    except ConfigError:  # the settings' own error is the one to tell
        return None
    return not_located(state_dir, given=given, flags="--dsn or --state-dir",
                       setting="EDGESYNC_INGEST__POSTGRES_DSN")


@contextlib.contextmanager
def exit_when_unavailable(doing: str, *, dsn: str | None = None,
                          state_dir: Path | None = None) -> Iterator[None]:
    """A database that cannot be reached or refuses the work (``OSError``,
    ``asyncpg.PostgresError``) inside the block prints ``cannot <doing>: …`` (on stderr,
    as every error of the CLI: stdout is the command's data) and exits
    :data:`EXIT_UNAVAILABLE`; the one rule of every command that reads PostgreSQL.

    Args:
        dsn, state_dir: the command's ``--dsn`` and ``--state-dir``: when neither (nor
            the environment) said where the database is, the message says that first.
    """
    import asyncpg

    try:
        yield
    except ConfigError as exc:
        _errors.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    except (OSError, asyncpg.PostgresError) as exc:
        _errors.print(f"[red]cannot {doing}:[/red] {escape(reason(exc))}")
        note = None if state_dir is None else _not_located(dsn, state_dir)
        if note is not None:
            _errors.print(escape(note))
        raise typer.Exit(EXIT_UNAVAILABLE) from exc


def run_on_database(dsn: str | None, state_dir: Path, job: Callable[[Any], Awaitable[T]], *,
                    doing: str, migrate: bool = False) -> T:
    """Run ``job(connection)`` on one connection to the resolved DSN and return its result.

    Our own refusals (:class:`~broker.errors.EdgesyncError`) print their message and exit
    :data:`EXIT_REFUSED`; a database that is unreachable, refuses the work or has no
    schema yet prints ``cannot <doing>: …`` and exits :data:`EXIT_UNAVAILABLE`.

    Args:
        migrate: apply pending migrations first (for commands that may come before any
            service has started, such as adding the first operator).
    """
    import asyncpg

    async def main() -> T:
        from broker.pg_connecting import connected

        async with connected(resolve_dsn(dsn, state_dir)) as conn:
            if migrate:
                from cloud_ingest.schema import migrate as apply_migrations

                await apply_migrations(conn)
            return await job(conn)

    with exit_when_unavailable(doing, dsn=dsn, state_dir=state_dir):
        try:
            return asyncio.run(main())
        except EdgesyncError as exc:
            _errors.print(f"[red]refused:[/red] {escape(str(exc))}")
            raise typer.Exit(EXIT_REFUSED) from exc
        except asyncpg.UndefinedTableError as exc:
            _errors.print(f"[red]cannot {doing}:[/red] {escape(str(exc))} (the schema is not "
                          "there yet: start the ingest once, it applies the migrations)")
            raise typer.Exit(EXIT_UNAVAILABLE) from exc
