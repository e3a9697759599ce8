"""The bridge killed with SIGKILL under load: every acknowledged record survives, once."""

from __future__ import annotations

import asyncio
from pathlib import Path

from broker.pg_connecting import connected
from broker.runtime.embedded_nats import EmbeddedNats
from edge_bridge.sdk import EdgeClient, RecordAck
from tests.helpers import until
from tests.integration.harness import BridgeProcess, bridge_settings, running_ingest


async def test_acknowledged_records_survive_a_bridge_sigkill_exactly_once(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """Kill -9 the bridge mid-publish and restart it: each acked record is one row."""
    settings = bridge_settings(tmp_path)
    bridge = BridgeProcess(settings, nats_server.url, tmp_path / "bridge.log")
    acked: list[int] = []
    total = 30_000
    async with running_ingest(pg_dsn, nats_server.url):
        await bridge.start()
        try:
            async with EdgeClient(bridge.url, linger_ms=1, retry_timeout_s=60) as client:

                def on_ack(i: int) -> object:
                    def done(fut: asyncio.Future[RecordAck]) -> None:
                        if not fut.cancelled() and fut.exception() is None:
                            acked.append(i)
                    return done

                futures = []
                for i in range(total):
                    fut = client.publish("s", {"id": i})
                    fut.add_done_callback(on_ack(i))  # type: ignore[arg-type]
                    futures.append(fut)
                    if i % 500 == 0:
                        await asyncio.sleep(0)  # let batches go out while we produce
                    if i == total // 3:
                        await until(lambda: len(acked) > 2_000, timeout=20)
                        bridge.kill()  # mid-stream: requests in flight, commits pending
                        await bridge.start()
                await client.flush()
            assert len(acked) == total  # the SDK retried through the crash
        finally:
            await bridge.stop()
        restarted = await asyncio.to_thread((tmp_path / "bridge.log").read_text)
        assert restarted.count("bridge_started") == 2
        async with connected(pg_dsn) as conn:
            async def all_committed() -> bool:
                n = await conn.fetchval(
                    "SELECT count(DISTINCT (payload->>'id')::int) FROM records"
                )
                return bool(n == total)

            # The restarted bridge was stopped: drain what it shipped before stopping.
            await bridge.start()
            await until(all_committed, timeout=60, interval=0.2,
                        message="not every acknowledged record reached Postgres")
            dupes = await conn.fetch(
                "SELECT payload->>'id' AS id, count(*) FROM records GROUP BY 1 HAVING count(*) > 1"
            )
            assert dupes == []
            await bridge.stop()
