"""``edgesync edges``: reading the identities writes nothing; provisioning keeps
everything it makes private (directories 0700, seeds 0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli.main import app


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _squeezed(text: str) -> str:
    return "".join(text.split())  # rich wraps long lines (even inside a path) at its width


@pytest.mark.parametrize("command", [["list"], ["revoke", "e1"]])
def test_reading_or_revoking_where_there_are_no_identities_fails_and_writes_nothing(
    tmp_path: Path, command: list[str],
) -> None:
    """Outside a state directory `edges list` (and `revoke`) used to make one, with fresh
    service keys, and list those; now it exits 2 naming the missing directory and
    the flags that point elsewhere, and the directory stays empty."""
    state = tmp_path / ".edgesync"
    result = CliRunner().invoke(app, ["edges", *command, "--state-dir", str(state)])
    assert result.exit_code == 2, result.output
    said = _squeezed(result.output)
    assert _squeezed(f"no identities at {state.absolute() / 'nats-auth'}") in said
    assert _squeezed("pass --state-dir or --auth-dir") in said
    assert list(tmp_path.iterdir()) == []


def test_adding_an_edge_where_nothing_exists_makes_every_directory_0700_and_file_0600(
    tmp_path: Path,
) -> None:
    """`edges add` may create the state directory; no directory it makes on the way
    (the state directory included) is readable by others, and no file it writes is."""
    state = tmp_path / "a" / ".edgesync"
    result = CliRunner().invoke(app, ["edges", "add", "e1", "--state-dir", str(state),
                                      "--no-control-consumer"])
    assert result.exit_code == 0, result.output
    made = [tmp_path / "a", *(Path(d) for d, _, _ in os.walk(tmp_path / "a"))]
    files = [Path(d) / f for d, _, fs in os.walk(tmp_path / "a") for f in fs]
    assert {str(d): _mode(d) for d in made} == {str(d): 0o700 for d in made}
    assert {str(f): _mode(f) for f in files} == {str(f): 0o600 for f in files}
    assert {f.name for f in files} >= {"edge-e1.nk", "admin.nk", "identities.json"}

    listed = CliRunner().invoke(app, ["edges", "list", "--state-dir", str(state)])
    assert listed.exit_code == 0, listed.output
    assert "edge-e1" in listed.output
