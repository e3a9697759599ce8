"""A CLI command run where there is no ``.edgesync/runtime.json`` (the wrong directory)
falls back to the default addresses; when connecting there fails, the error says the
real cause — no runtime.json, and the flags or settings that say where to go — rather
than only a refused port. An address the user gave gets no such note. NATS failures are
one line with a reason, never nats-py's tracebacks or an empty ``TimeoutError:``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from broker.cli.locating import reason
from tests.support.processes import refused_port

_DEADLINE_S = 60
_NOTE = "no .edgesync/runtime.json here: run where `edgesync up` runs, or pass"


def _edgesync(cwd: Path, *args: str, **env: str) -> tuple[int, str]:
    """`edgesync ARGS` in ``cwd``, with no EDGESYNC_* setting but ``env``; its exit code
    and its output (stdout and stderr), whitespace squeezed (rich wraps at its width)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGESYNC_")}
    done = subprocess.run([sys.executable, "-m", "broker", *args], cwd=cwd,
                          env={**clean, "COLUMNS": "300", **env}, capture_output=True,
                          text=True, timeout=_DEADLINE_S, check=False)
    return done.returncode, " ".join((done.stdout + done.stderr).split())


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("command", [["status"], ["tail", "--no-follow"],
                                     ["dead-letters", "list"]])
def test_a_database_command_without_runtime_json_says_so_when_it_cannot_connect(
    tmp_path: Path, command: list[str],
) -> None:
    if _listening(5432):
        pytest.skip("something listens on PostgreSQL's default port 5432 here")
    code, said = _edgesync(tmp_path, *command)
    assert code == 2, said
    assert "cannot read" in said
    assert (f"{_NOTE} --dsn or --state-dir (or set EDGESYNC_INGEST__POSTGRES_DSN)"
            in said)


def test_a_dsn_given_by_flag_gets_no_note_about_runtime_json(tmp_path: Path) -> None:
    with refused_port() as port:
        code, said = _edgesync(tmp_path, "status", "--dsn",
                               f"postgresql://edgesync@127.0.0.1:{port}/edgesync")
    assert code == 2, said
    assert f"cannot read status: [Errno 111] Connect call failed ('127.0.0.1', {port})" in said
    assert "runtime.json" not in said


def test_streams_check_without_runtime_json_says_so_in_one_line_with_a_reason(
    tmp_path: Path,
) -> None:
    if _listening(4222):
        pytest.skip("something listens on the default NATS port 4222 here")
    code, said = _edgesync(tmp_path, "streams", "check",
                           EDGESYNC_NATS__CONNECT_TIMEOUT_S="0.5")
    assert code == 2, said
    assert "Traceback" not in said  # nats-py's error callback printed one per try
    assert ("cannot reach NATS at nats://127.0.0.1:4222: TimeoutError: not connected within "
            "1.5 s; last error: ConnectionRefusedError:") in said
    assert (f"{_NOTE} --state-dir (or set EDGESYNC_NATS__URL and the admin's "
            "EDGESYNC_NATS__CREDENTIALS_FILE)") in said


def test_streams_check_against_a_configured_url_names_it_without_the_note(
    tmp_path: Path,
) -> None:
    with refused_port() as port:
        code, said = _edgesync(tmp_path, "streams", "check",
                               EDGESYNC_NATS__URL=f"nats://127.0.0.1:{port}",
                               EDGESYNC_NATS__CONNECT_TIMEOUT_S="0.5")
    assert code == 2, said
    assert "Traceback" not in said
    assert f"cannot reach NATS at nats://127.0.0.1:{port}: TimeoutError: not connected" in said
    assert "runtime.json" not in said


def test_an_exception_without_a_message_is_named_by_what_it_means() -> None:
    assert reason(TimeoutError()) == "timed out"
    assert reason(ConnectionRefusedError()) == "connection refused"
    assert reason(KeyError()) == "KeyError"
    assert reason(OSError(111, "Connection refused")) == "[Errno 111] Connection refused"


def test_a_command_to_the_api_without_runtime_json_says_so_when_it_cannot_connect(
    tmp_path: Path,
) -> None:
    if _listening(8789):
        pytest.skip("something listens on the API's default port 8789 here")
    code, said = _edgesync(tmp_path, "cmd", "edges")
    assert code == 2, said
    assert "cannot reach the API at http://127.0.0.1:8789:" in said
    assert f"{_NOTE} --api-url or --state-dir (or set EDGESYNC_API__URL)" in said
