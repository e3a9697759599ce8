"""Where the CLI writes: its data on stdout, its errors on stderr.

Piped, rich lays tables out for 80 columns and cuts what does not fit: a command id in
``edgesync cmd list | less`` came out as ``22549dfa-0e06…``, which no other command
takes. Piped output is laid out for :data:`PIPED_WIDTH` columns instead (unless
``COLUMNS`` says otherwise); a terminal keeps its own width.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Final

from rich.console import Console

__all__ = ["PIPED_WIDTH", "stderr_console", "stdout_console"]

PIPED_WIDTH: Final = 400
"""Columns a table may take when stdout is not a terminal: wide enough for every
table of the CLI, so none has a cell cut."""


def stdout_console(**options: Any) -> Console:
    """The console of a command's own output (``options``: rich's)."""
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=PIPED_WIDTH if piped else None, **options)


def stderr_console() -> Console:
    """The console of a command's errors and warnings: never into the data it prints."""
    return Console(stderr=True, soft_wrap=True)
