"""``edgesync bridge`` starts without the command line and without libraries it never uses.

Each check runs in a fresh interpreter: what a process imports is the point.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

WAIT_S = 60.0

_PROBE = textwrap.dedent('''
    import json, os, sys
    from broker.cli.services import skip_unused_libraries
    skipped = skip_unused_libraries(os.environ)
    import edge_bridge.bridge  # everything a bridge imports to run
    loaded = sorted(n for n in ("aiohttp", "rich", "typer", "broker.cli.main", "fastapi")
                    if sys.modules.get(n) is not None)
    print(json.dumps({"skipped": skipped, "loaded": loaded}))
''')


def _probe(**env: str) -> dict[str, list[str]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGESYNC_")}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, check=True,
                         capture_output=True, text=True, timeout=WAIT_S).stdout
    result: dict[str, list[str]] = json.loads(out.strip().splitlines()[-1])
    return result


def test_a_bridge_loads_neither_the_cli_nor_aiohttp_nor_rich() -> None:
    """With JSON logs and a nats:// URL, the bridge's imports leave all of them out,
    and FastAPI too (the cloud API's framework: ~6 MiB of an idle bridge)."""
    result = _probe(EDGESYNC_NATS__URL="nats://127.0.0.1:4222")
    assert result == {"skipped": ["aiohttp", "rich"], "loaded": []}


def test_a_websocket_url_or_console_logs_keep_what_they_need() -> None:
    """nats-py needs aiohttp for ws://; console logs may use rich for tracebacks."""
    result = _probe(EDGESYNC_NATS__URL="wss://nats.example:443", EDGESYNC_LOG__FORMAT="console")
    assert result["skipped"] == []


def test_the_lean_bridge_exits_with_the_error_status_on_bad_settings(tmp_path: Path) -> None:
    """``python -m broker bridge`` with an invalid setting fails at start-up with status 2
    and names the problem, as the full command line does."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGESYNC_")}
    proc = subprocess.run(
        [sys.executable, "-m", "broker", "bridge"], check=False,
        env={**clean, "EDGESYNC_BRIDGE__EDGE_ID": "not.valid",
             "EDGESYNC_BRIDGE__BUFFER_DIR": str(tmp_path / "buffer")},
        capture_output=True, text=True, timeout=WAIT_S, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "invalid edge id 'not.valid'" in proc.stderr


_BUFFERS = textwrap.dedent('''
    import resource, sys
    from broker.cli.services import reuse_freed_memory
    took = reuse_freed_memory() if sys.argv[1] == "reuse" else None

    def requests(n):  # a request's passage: its body, a joined copy, a translated one
        for i in range(n):
            body = bytes([i % 256]) * 220_000
            joined = body + b"," * 180_000
            translated = joined.replace(b",", b";")
            del body, joined, translated

    requests(50)  # the first requests may map what the process never had
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    requests(200)
    print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
''')


_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _GLIBC, reason="glibc's malloc")
def test_the_bridge_reuses_the_request_sized_buffers_it_frees() -> None:
    """Once tuned, buffers of a request's size freed by one request are reused by the
    next: no page faults (untuned, glibc hands them back and faults in fresh pages)."""
    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _BUFFERS, mode], check=True,
                             capture_output=True, text=True, timeout=WAIT_S).stdout.split()
        return out[0], int(out[1])

    took, tuned = faults("reuse")
    _, untuned = faults("default")
    assert took == "True"
    assert tuned < 100, tuned  # a few pages at most, for whatever else the loop touches
    assert untuned > 10_000, untuned  # ~100 pages per buffer, per request


@pytest.mark.parametrize("variable", [
    {"MALLOC_TRIM_THRESHOLD_": "1048576"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
])
def test_an_operators_own_malloc_tuning_wins(variable: dict[str, str]) -> None:
    """With malloc tuned in the environment, the bridge leaves it as the operator set it."""
    code = "from broker.cli.services import reuse_freed_memory; print(reuse_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=WAIT_S, env={**os.environ, **variable}).stdout
    assert out.split() == ["False"]
