"""A PostgreSQL that hangs rather than refuses shows in the ingest's readiness within
seconds, not at a write's 60 s command timeout (found by stopping PostgreSQL with
SIGSTOP under ``edgesync up``: readiness stayed true and db_up 1 for a minute)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from broker.pg_connecting import connected
from broker.runtime.embedded_nats import EmbeddedNats
from broker.runtime.embedded_postgres import EmbeddedPostgres
from broker.runtime.processes import child_pids
from cloud_ingest.service import DRAIN_S
from tests.integration.harness import running_ingest
from tests.support import until


@contextmanager
def _frozen(postmaster: int) -> Iterator[None]:
    """The postmaster and every process under it stopped (SIGSTOP) for the block: a
    database that takes connections and statements and answers none of them."""
    frozen = [postmaster, *child_pids(postmaster)]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)


def _db_up(ingest: object) -> float | None:
    registry = ingest.metrics.registry  # type: ignore[attr-defined]
    return registry.get_sample_value("edgesync_ingest_db_up")  # type: ignore[no-any-return]


async def test_a_hung_database_turns_readiness_false_within_seconds_and_back(
        tmp_path: Path, nats_server: EmbeddedNats) -> None:
    async with EmbeddedPostgres(tmp_path / "pg") as pg:
        dsn = await pg.create_database("hung")
        async with running_ingest(dsn, nats_server.url, db_probe_interval_s=0.2,
                                  db_probe_timeout_s=1.0) as ingest:
            await until(lambda: ingest.ready, timeout=10, message="ingest never ready")
            assert pg.pid is not None
            with _frozen(pg.pid):
                await until(lambda: not ingest.ready, timeout=10,
                            message="readiness stayed true while PostgreSQL hung")
                assert _db_up(ingest) == 0
            await until(lambda: ingest.ready, timeout=20,
                        message="readiness did not come back with PostgreSQL")
            assert _db_up(ingest) == 1


async def test_a_watch_connection_ended_by_an_administrator_is_no_outage(
        pg_dsn: str, nats_server: EmbeddedNats) -> None:
    """A DBA ending the watch's session (or every session, to apply a setting) is asked
    again on a new connection, not reported as a database that does not answer."""
    async with running_ingest(pg_dsn, nats_server.url, db_probe_interval_s=0.05,
                              db_probe_timeout_s=2.0) as ingest:
        watch = ingest.db_watch
        assert watch is not None
        await until(lambda: watch._conn is not None, message="the watch never connected")
        changes: list[bool] = []
        watch._on_change = changes.append
        for _ in range(3):
            conn = watch._conn
            assert conn is not None
            pid = conn.get_server_pid()
            async with connected(pg_dsn) as admin:
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            await until(lambda pid=pid: watch._conn is not None  # type: ignore[misc]
                        and watch._conn.get_server_pid() != pid,
                        message="the watch did not ask again on a new connection")
        assert changes == []
        assert ingest.ready and _db_up(ingest) == 1


async def test_the_watch_ends_with_the_ingest_not_at_its_drain_deadline(
        pg_dsn: str, nats_server: EmbeddedNats) -> None:
    """The shutdown waits for every root task up to DRAIN_S: a watch that did not end
    when asked held every stop of the ingest for that long (8 s)."""
    async with running_ingest(pg_dsn, nats_server.url) as ingest:
        watch = ingest.db_watch
        assert watch is not None
        await until(lambda: watch._conn is not None, message="the watch never connected")
        stopping = time.monotonic()
    assert time.monotonic() - stopping < DRAIN_S
    assert watch._conn is None  # its connection went with it
