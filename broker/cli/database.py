"""Where the CLI's direct-to-PostgreSQL commands (``status``, ``dead-letters``) connect."""

from __future__ import annotations

import json
from pathlib import Path

from broker.settings import Settings

__all__ = ["resolve_dsn"]


def resolve_dsn(dsn: str | None, state_dir: Path) -> str:
    """``--dsn``, else the ``runtime.json`` of ``edgesync up``, else the ingest's setting."""
    if dsn:
        return dsn
    runtime = state_dir / "runtime.json"
    if runtime.exists():
        return str(json.loads(runtime.read_text())["postgres_dsn"])
    return Settings().ingest.postgres_dsn
