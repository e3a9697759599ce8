"""The bench's command line: what ``--py-spy-gil`` asks of py-spy, and its refusal alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cli import main
from bench.procs import py_spy_command


def test_py_spy_samples_every_busy_thread_unless_asked_for_the_gil_holder_only() -> None:
    out = Path("/tmp/x.txt")
    default = py_spy_command("py-spy", 42, out)
    gil = py_spy_command("py-spy", 42, out, gil=True)
    assert default[:4] == ["py-spy", "record", "--pid", "42"] and "--gil" not in default
    assert gil == [*default, "--gil"]


def test_py_spy_gil_without_py_spy_is_refused_with_the_reason(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--py-spy-gil", "--only", "wire"])
    assert exited.value.code == 2
    assert "--py-spy-gil needs --py-spy DIR" in capsys.readouterr().err
