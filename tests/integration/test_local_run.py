"""`edgesync up`: the whole system from one command, and a clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg

from tests.helpers import until


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (its parent has exited and init reaps lazily).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


async def test_up_with_simulation_commits_growing_rows_and_stops_cleanly(tmp_path: Path) -> None:
    """`edgesync up --simulate 1000`: committed rows grow within 10 s; Ctrl-C stops
    every process it started."""
    state = tmp_path / "state"
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "up", "--simulate", "1000", "--state-dir", str(state),
         "--bridge-port", "0"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        runtime_file = state / "runtime.json"
        await until(runtime_file.exists, timeout=30, interval=0.1,
                    message="runtime.json never appeared")
        runtime = json.loads(runtime_file.read_text())
        assert set(runtime) >= {"nats_url", "postgres_dsn", "bridges"}
        assert list(runtime["bridges"]) == ["edge-1"]
        conn = await asyncpg.connect(runtime["postgres_dsn"])
        try:
            counts: list[int] = []

            async def grown() -> bool:
                count = int(await conn.fetchval("SELECT count(*) FROM records"))
                if count:
                    counts.append(count)
                return len(counts) > 1 and counts[-1] > counts[0]

            await until(grown, timeout=10, interval=0.25, message="committed rows not growing")
        finally:
            await conn.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, (tmp_path / "up.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    for pid in (runtime["nats_pid"], runtime["postgres_pid"]):
        await until(lambda pid=pid: not _alive(pid), timeout=10,
                    message=f"process {pid} outlived edgesync up")
    assert not runtime_file.exists()
