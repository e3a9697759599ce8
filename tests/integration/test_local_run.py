"""`edgesync up`: the whole system from one command, and a clean stop."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from tests.support import alive, edgesync_up, until


async def test_up_with_simulation_commits_growing_rows_and_stops_cleanly(tmp_path: Path) -> None:
    """`edgesync up --simulate 1000`: committed rows grow within 10 s; Ctrl-C stops
    every process it started."""
    async with edgesync_up(tmp_path, "--simulate", "1000", "--bridge-port", "0") as up:
        runtime = up.runtime
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
        assert up.interrupt() == 0, up.log_tail()
    for pid in (runtime["nats_pid"], runtime["postgres_pid"]):
        await until(lambda pid=pid: not alive(pid), timeout=10,
                    message=f"process {pid} outlived edgesync up")
    assert not up.runtime_file.exists()
