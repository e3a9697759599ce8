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


async def test_up_with_simulation_commits_growing_rows_and_stops_cleanly(
    tmp_path: Path, reachable_dir: Path
) -> None:
    """`edgesync up --simulate 1000`: committed rows grow within 10 s; Ctrl-C stops
    every process it started."""
    state = reachable_dir / "state"  # edgesync up keeps a persistent PostgreSQL there
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


class _Up:
    """One `edgesync up` child process in ``state``, stopped by SIGINT."""

    def __init__(self, state: Path, log_path: Path, *args: str) -> None:
        self.state = state
        self.log_path = log_path
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> dict[str, object]:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "broker", "up", "--state-dir", str(self.state),
                 "--bridge-port", "0", "--api-port", "0", *self.args],
                stdout=log, stderr=subprocess.STDOUT,
            )
        runtime_file = self.state / "runtime.json"

        def started() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(self.log_path.read_text()[-3000:])
            return runtime_file.exists()

        await until(started, timeout=60, interval=0.1, message="runtime.json never appeared")
        return dict(json.loads(runtime_file.read_text()))

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        assert code == 0, self.log_path.read_text()[-3000:]


async def _completeness(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(
            "SELECT stream, epoch, committed_records, watermark, highest_seq, missing_records, "
            "lost_after_commit_records FROM v_completeness"))
    finally:
        await conn.close()


async def test_a_second_up_continues_where_the_first_stopped_and_fresh_starts_over(
    tmp_path: Path, reachable_dir: Path
) -> None:
    """State survives `edgesync up` restarts together: the second run finds the first
    run's rows, its buffers continue the same epoch with 0 missing and nothing lost;
    `--fresh` wipes database, NATS store and buffers at once."""
    state = reachable_dir / "state"
    log_path = tmp_path / "up.log"
    async with _Up(state, log_path, "--simulate", "500") as runtime:
        dsn = str(runtime["postgres_dsn"])
        await until(lambda: count_committed(dsn, 1_000), timeout=30, interval=0.25,
                    message="the first run committed too little")
    async with _Up(state, log_path, "--simulate", "200") as runtime:
        dsn = str(runtime["postgres_dsn"])
        first = (await _completeness(dsn))[0]
        assert first["committed_records"] >= 1_000  # the first run's rows are there

        async def continued() -> asyncpg.Record | None:
            rows = await _completeness(dsn)
            row = rows[0] if len(rows) == 1 else None
            ok = (row is not None and row["epoch"] == first["epoch"]
                  and row["watermark"] > first["highest_seq"] + 200
                  and row["missing_records"] == 0)
            return row if ok else None

        second = await until(continued, timeout=60, interval=0.25,
                             message="the second run did not continue")
    assert second["lost_after_commit_records"] == 0
    async with _Up(state, log_path, "--fresh") as runtime:
        assert await _completeness(str(runtime["postgres_dsn"])) == []


async def count_committed(dsn: str, at_least: int) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM records")) >= at_least
    finally:
        await conn.close()
