"""``edgesync up`` listens on the ports asked for (8787 and 8789 by default) or stops
before starting anything; it never moves to other ports on its own, which left an SDK
pointed at 8787 talking to another instance. Port 0 still means free ports (what the
tests of `up` itself use)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_DEADLINE_S = 30  # an `up` that does not refuse would start everything: never wait forever


@contextlib.contextmanager
def _held(port: int = 0) -> Iterator[int]:
    """A loopback port someone listens on for as long as the block runs (``port``, or a
    free one); a port that someone else already holds is held all the same."""
    try:
        server = socket.create_server(("127.0.0.1", port))
    except OSError:
        yield port  # taken already: as held as it gets
        return
    with server:
        yield int(server.getsockname()[1])


def _up(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `edgesync up ARGS`; its exit code and what it said on stderr (its refusals
    belong there: nothing on stdout, which it must leave empty). One that does not refuse
    within the deadline is stopped as Ctrl-C would stop it, and fails the test."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGESYNC_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "up", "--state-dir", str(tmp_path / "state"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**clean, "COLUMNS": "300", **(env or {})}, cwd=tmp_path)
    try:
        out, err = proc.communicate(timeout=_DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: `up` stops what it started
        out, err = proc.communicate(timeout=_DEADLINE_S)
        pytest.fail(f"edgesync up started instead of refusing:\n{out}{err}")
    assert out == "", out
    return proc.returncode, " ".join(err.split())


@pytest.mark.parametrize("flag", ["--bridge-port", "--api-port"])
def test_an_explicit_port_that_is_taken_is_an_error_naming_port_and_flag(
    tmp_path: Path, flag: str,
) -> None:
    other = "--api-port" if flag == "--bridge-port" else "--bridge-port"
    with _held() as port:
        code, said = _up(tmp_path, flag, str(port), other, "0")
    assert code == 2, said
    assert f"port {port} ({flag} {port}) is not free" in said
    assert f"{flag} 0 for a free one" in said
    assert not (tmp_path / "state").exists()  # refused before anything started


def test_a_taken_default_bridge_port_is_an_error_too(tmp_path: Path) -> None:
    """A second `up` elsewhere, with the defaults, stops instead of moving its bridge."""
    with _held(8787):
        code, said = _up(tmp_path, "--api-port", "0")
    assert code == 2, said
    assert "port 8787 (--bridge-port 8787) is not free" in said
    assert not (tmp_path / "state").exists()


def _free(port: int) -> bool:
    try:
        with socket.create_server(("127.0.0.1", port)):
            return True
    except OSError:
        return False


def test_every_bridge_port_is_checked_not_only_the_first(tmp_path: Path) -> None:
    """`--edges 3 --bridge-port P` needs P, P+1 and P+2: a taken P+2 is refused too."""
    with _held() as last:
        first = last - 2
        if not (_free(first) and _free(first + 1)):
            pytest.skip(f"ports {first} and {first + 1} are not both free on this machine")
        code, said = _up(tmp_path, "--edges", "3", "--bridge-port", str(first), "--api-port",
                         "0")
    assert code == 2, said
    assert f"port {last} (--bridge-port {first}) is not free" in said


def test_an_api_port_among_the_bridge_ports_is_an_error(tmp_path: Path) -> None:
    """With `--edges 3` the bridges take 8787-8789; the API's default 8789 collides."""
    code, said = _up(tmp_path, "--edges", "3")
    assert code == 2, said
    assert "--api-port 8789 is one of the 3 bridges' ports from --bridge-port 8787" in said
    assert not (tmp_path / "state").exists()


def test_edgesync_settings_up_ignores_are_named_not_ignored_in_silence(tmp_path: Path) -> None:
    """`up` runs on embedded defaults: an EDGESYNC_* setting someone exported (a producer
    token they expect enforced) is named as ignored, on stderr, before anything else."""
    code, said = _up(tmp_path, "--edges", "3",
                     env={"EDGESYNC_BRIDGE__PRODUCER_TOKENS": '{"t": ["*"]}',
                          "EDGESYNC_PG_TEMPLATE_DIR": str(tmp_path / "template")})
    assert code == 2, said
    assert said.startswith("warning: `edgesync up` runs on its embedded defaults and ignores "
                           "EDGESYNC_BRIDGE__PRODUCER_TOKENS;"), said
    assert "EDGESYNC_PG_TEMPLATE_DIR" not in said  # the one it reads
