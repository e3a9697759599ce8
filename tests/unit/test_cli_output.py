"""The CLI's consoles: piped tables are not cut at rich's 80 columns (a command id in
``edgesync cmd list | less`` came out as ``22549dfa-0e06…``); errors go to stderr."""

from __future__ import annotations

import io
import sys

import pytest
from rich.table import Table

from broker.cli.output import PIPED_WIDTH, stderr_console, stdout_console

ID = "22549dfa-0e06-4f5e-9d3c-6f1f2b3c4d5e"


def _table() -> Table:
    table = Table("id", "edge", "kind", "status", "created", "reason")
    table.add_row(ID, "edge-with-a-long-name-0001", "bridge.configure", "succeeded",
                  "2026-12-05T06:45:15.123456+00:00", "applied: linger_ms 2000 " * 3)
    return table


def test_a_piped_table_keeps_every_cell_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # not a terminal
    console = stdout_console()
    assert console.width == PIPED_WIDTH
    console.print(_table())
    out = sys.stdout.getvalue()  # type: ignore[attr-defined]
    assert ID in out
    assert "…" not in out


def test_columns_still_decides_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert stdout_console().width == 100


def test_errors_go_to_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    stderr_console().print("error: nope")
    assert sys.stderr.getvalue() == "error: nope\n"  # type: ignore[attr-defined]
    assert sys.stdout.getvalue() == ""  # type: ignore[attr-defined]
