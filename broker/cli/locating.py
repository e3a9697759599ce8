"""Where a CLI command finds the running system, and what it says when it cannot.

``edgesync up`` writes ``runtime.json`` in its state directory (``.edgesync`` by
default): the DSN, the NATS URL and CA, the API URL, the operator token. A command
reads it from ``--state-dir`` when no flag or ``EDGESYNC_*`` setting says where to go;
with neither, it falls back to the settings' defaults (``127.0.0.1:5432``,
``nats://127.0.0.1:4222``), and a failure to connect there is, nearly always, a
command run from the wrong directory: :func:`not_located` says so, so the error names
that cause and not a refused port.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["RUNTIME_FILE", "not_located", "read_runtime", "reason"]

RUNTIME_FILE = "runtime.json"
"""The file ``edgesync up`` writes in its state directory (see :mod:`broker.cli.local_run`)."""


def read_runtime(state_dir: Path) -> dict[str, Any]:
    """The ``runtime.json`` of ``edgesync up`` in ``state_dir``; empty when there is none."""
    path = state_dir / RUNTIME_FILE
    if not path.exists():
        return {}
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def not_located(state_dir: Path, *, given: bool, flags: str, setting: str) -> str | None:
    """What to add to a connection error when the address was only a default guess.

    Args:
        given: a flag or an ``EDGESYNC_*`` setting named the address (then there is
            nothing to add: the error is about what the user asked for).
        flags: the command's options that say where to go, as the user types them.
        setting: the environment setting that does the same.

    Returns:
        None when the address came from ``given`` or from a ``runtime.json``; else
        ``no <state-dir>/runtime.json here: run where `edgesync up` runs, or ...``.
    """
    if given or (state_dir / RUNTIME_FILE).exists():
        return None
    return (f"no {state_dir / RUNTIME_FILE} here: run where `edgesync up` runs, or pass "
            f"{flags} (or set {setting})")


_UNSAID = {TimeoutError: "timed out", ConnectionRefusedError: "connection refused"}


def reason(exc: BaseException) -> str:
    """``exc`` for a person: its message, or, when it has none (``TimeoutError()``),
    what its type means."""
    text = str(exc).strip()
    if text:
        return text
    for kind, said in _UNSAID.items():
        if isinstance(exc, kind):
            return said
    return type(exc).__name__
