"""`edgesync up`: the whole system from one command, and a clean stop."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from broker.pg_connecting import connected
from tests.support import alive, edgesync_up, until


async def test_up_with_simulation_commits_growing_rows_and_stops_cleanly(
    tmp_path: Path, reachable_dir: Path
) -> None:
    """`edgesync up --simulate 1000`: committed rows grow within 10 s, in a PostgreSQL
    that fsyncs its commits; Ctrl-C stops every process it started."""
    async with edgesync_up(tmp_path, "--simulate", "1000", "--bridge-port", "0",
                           "--api-port", "0", state=reachable_dir / "state") as up:
        runtime = up.runtime
        assert set(runtime) >= {"nats_url", "postgres_dsn", "bridges"}
        assert list(runtime["bridges"]) == ["edge-1"]
        async with connected(runtime["postgres_dsn"]) as conn:
            counts: list[int] = []

            async def grown() -> bool:
                count = int(await conn.fetchval("SELECT count(*) FROM records"))
                if count:
                    counts.append(count)
                return len(counts) > 1 and counts[-1] > counts[0]

            await until(grown, timeout=10, interval=0.25, message="committed rows not growing")
            # The bridges delete what PostgreSQL committed: its commits survive a power cut.
            for setting in ("fsync", "full_page_writes", "synchronous_commit"):
                assert await conn.fetchval(f"SHOW {setting}") == "on", setting
        assert up.interrupt() == 0, up.log_tail()
        assert "edgesync up stopped; its state is kept in" in up.log_tail()
    for pid in (runtime["nats_pid"], runtime["postgres_pid"]):
        await until(lambda pid=pid: not alive(pid), timeout=10,
                    message=f"process {pid} outlived edgesync up")
    assert not up.runtime_file.exists()


async def _completeness(dsn: str) -> list[asyncpg.Record]:
    async with connected(dsn) as conn:
        return list(await conn.fetch(
            "SELECT stream, epoch, committed_records, watermark, highest_seq, missing_records, "
            "lost_after_commit_records FROM v_completeness"))


async def _count_committed(dsn: str, at_least: int) -> bool:
    async with connected(dsn) as conn:
        return int(await conn.fetchval("SELECT count(*) FROM records")) >= at_least


async def test_a_second_up_continues_where_the_first_stopped_and_fresh_starts_over(
    tmp_path: Path, reachable_dir: Path
) -> None:
    """State survives `edgesync up` restarts together: the second run finds the first
    run's rows, its buffers continue the same epoch with 0 missing and nothing lost;
    `--fresh` wipes database, NATS store and buffers at once."""
    state = reachable_dir / "state"
    ports = ("--bridge-port", "0", "--api-port", "0")
    async with edgesync_up(tmp_path, "--simulate", "500", *ports, state=state) as up:
        dsn = str(up.runtime["postgres_dsn"])
        await until(lambda: _count_committed(dsn, 1_000), timeout=30, interval=0.25,
                    message="the first run committed too little")
        assert up.interrupt() == 0, up.log_tail()
    async with edgesync_up(tmp_path, "--simulate", "200", *ports, state=state) as up:
        dsn = str(up.runtime["postgres_dsn"])
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
        assert up.interrupt() == 0, up.log_tail()
    assert second["lost_after_commit_records"] == 0
    async with edgesync_up(tmp_path, "--fresh", *ports, state=state) as up:
        assert await _completeness(str(up.runtime["postgres_dsn"])) == []
        assert up.interrupt() == 0, up.log_tail()
