"""``edgesync up`` starts a dead PostgreSQL again even while what the dead one left holds
on: a backend busy in a query does not notice its postmaster is gone until it waits, and
keeps the shared memory, so the new postmaster refuses to start beside it. ``up`` then
retries with backoff (``start_again``) instead of stopping the whole run."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import asyncpg
import structlog.testing

from broker.cli.local_run import start_again
from broker.pg_connecting import connected
from broker.runtime.embedded_postgres import EmbeddedPostgres
from tests.support import alive, until


async def test_postgres_starts_again_once_an_orphaned_busy_backend_is_gone(
    tmp_path: Path,
) -> None:
    async with EmbeddedPostgres(tmp_path / "pg") as pg:
        conn = await asyncpg.connect(pg.dsn)
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        spinning = asyncio.create_task(conn.execute("DO $$ BEGIN LOOP END LOOP; END $$"))
        try:
            async def busy() -> bool:
                async with connected(pg.dsn) as probe:
                    return bool(await probe.fetchval(
                        "SELECT state = 'active' FROM pg_stat_activity WHERE pid = $1",
                        backend))
            await until(busy, timeout=20, message="the backend never got busy")
            postmaster = pg.pid
            assert postmaster is not None
            os.kill(postmaster, signal.SIGKILL)
            await until(lambda: not pg.running, timeout=20, message="postmaster outlived")
            assert alive(backend)  # orphaned, still in its loop, still attached
            await pg.stop()  # what `up` does first: release the dead run
            stop = asyncio.Event()
            with structlog.testing.capture_logs() as logs:
                starting = asyncio.create_task(start_again("postgres", pg.start, stop))
                await until(lambda: any(e["event"] == "embedded_server_start_failed"
                                        for e in logs), timeout=30,
                            message="a start beside the orphan was not refused")
                assert not starting.done()  # refused, and still trying
                os.kill(backend, signal.SIGKILL)  # as when its query ends
                assert await asyncio.wait_for(starting, 60)
            assert pg.running
            async with connected(pg.dsn) as again:
                assert await again.fetchval("SELECT 1") == 1
        finally:
            spinning.cancel()
            conn.terminate()
            if alive(backend):
                os.kill(backend, signal.SIGKILL)
