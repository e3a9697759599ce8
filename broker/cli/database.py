"""Where the CLI's direct-to-PostgreSQL commands (``status``, ``dead-letters``) connect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from broker.settings import Settings

__all__ = ["Dsn", "StateDir", "resolve_dsn"]

Dsn = Annotated[str | None, typer.Option(help="PostgreSQL DSN (default: runtime.json, then "
                                               "EDGESYNC_INGEST__POSTGRES_DSN).")]
"""The ``--dsn`` option of the commands that read PostgreSQL directly."""
StateDir = Annotated[Path, typer.Option(help="Where `edgesync up` wrote runtime.json.")]
"""The ``--state-dir`` option: where a running ``edgesync up`` is found."""


def resolve_dsn(dsn: str | None, state_dir: Path) -> str:
    """``--dsn``, else the ``runtime.json`` of ``edgesync up``, else the ingest's setting."""
    if dsn:
        return dsn
    runtime = state_dir / "runtime.json"
    if runtime.exists():
        return str(json.loads(runtime.read_text())["postgres_dsn"])
    return Settings().ingest.postgres_dsn
