"""Outages of NATS and PostgreSQL under load: buffer, resume, nothing lost or doubled."""

from __future__ import annotations

import asyncio
from pathlib import Path

from broker.pg_connecting import connected
from broker.runtime.embedded_nats import EmbeddedNats
from broker.runtime.embedded_postgres import EmbeddedPostgres
from edge_bridge.sdk import EdgeClient
from tests.helpers import until
from tests.integration.harness import (
    bridge_settings,
    count_records,
    running_bridge,
    running_ingest,
    wait_for_records,
)


async def publish_ids(url: str, ids: range) -> None:
    """Publish one record per id and wait until the bridge holds all of them durably."""
    async with EdgeClient(url, linger_ms=2) as client:
        futures = [client.publish("s", {"id": i}) for i in ids]
        await client.flush()
        for f in futures:
            f.result()  # raises if any publish failed


async def assert_each_id_once(dsn: str, n: int) -> None:
    async with connected(dsn) as conn:
        row = await conn.fetchrow(
            "SELECT count(*) AS rows, count(DISTINCT (payload->>'id')::int) AS ids, "
            "min((payload->>'id')::int) AS lo, max((payload->>'id')::int) AS hi FROM records"
        )
    assert dict(row) == {"rows": n, "ids": n, "lo": 0, "hi": n - 1}


async def test_nats_outage_is_buffered_then_drained(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """NATS stopped: the bridge keeps accepting durably; NATS back: it drains, exactly once."""
    async with running_ingest(pg_dsn, nats_server.url), running_bridge(
        bridge_settings(tmp_path), nats_server.url
    ) as bridge:
        await publish_ids(bridge.url, range(5_000))
        await wait_for_records(pg_dsn, 5_000)
        await nats_server.stop()
        await publish_ids(bridge.url, range(5_000, 10_000))
        stats = await bridge.buffer.stats()
        assert stats.unshipped_records == 5_000  # held at the edge, not lost
        assert await count_records(pg_dsn) == 5_000
        await nats_server.restart()
        await wait_for_records(pg_dsn, 10_000, timeout=60)
        await until(lambda: _empty(bridge), timeout=10, message="buffer not trimmed")
    await assert_each_id_once(pg_dsn, 10_000)


async def _empty(bridge: object) -> bool:
    stats = await bridge.buffer.stats()  # type: ignore[attr-defined]
    return bool(stats.records == 0)


async def test_postgres_outage_under_the_ingest_heals_by_itself(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    """PostgreSQL stopped and started: the ingest stops acking, reports not ready,
    then resumes on its own; nothing lost, nothing duplicated."""
    async with EmbeddedPostgres(tmp_path / "pg", synchronous_commit=True) as pg:
        dsn = pg.dsn
        async with running_ingest(dsn, nats_server.url) as ingest, running_bridge(
            bridge_settings(tmp_path), nats_server.url
        ) as bridge:
            await publish_ids(bridge.url, range(5_000))
            await wait_for_records(dsn, 5_000)
            await pg.stop()
            publishing = asyncio.create_task(publish_ids(bridge.url, range(5_000, 10_000)))
            await until(lambda: not ingest.ready, timeout=20, message="ingest still ready")
            await publishing
            await pg.restart()
            await wait_for_records(dsn, 10_000, timeout=60)
            await until(lambda: ingest.ready, timeout=10, message="ingest not ready again")
        await assert_each_id_once(dsn, 10_000)
