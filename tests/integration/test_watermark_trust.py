"""The edge never trims above what it shipped itself, whatever watermark it is told."""

from __future__ import annotations

from pathlib import Path

import httpx
import nats

from broker.runtime.embedded_nats import EmbeddedNats
from edge_bridge.bridge import Bridge
from edge_bridge.sdk import EdgeClient
from tests.helpers import until
from tests.integration.harness import bridge_settings, running_bridge


async def publish(url: str, stream: str, n: int) -> int:
    """Publish ``n`` records; returns their epoch."""
    async with EdgeClient(url, linger_ms=1) as client:
        futures = [client.publish(stream, {"i": i}) for i in range(n)]
        await client.flush()
    return futures[0].result().epoch


def shipped(bridge: Bridge, stream: str) -> int:
    state = bridge.buffer.stream_state(stream)
    return 0 if state is None else state.shipped_seq


async def ignored(bridge: Bridge, reason: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{bridge.url}/metrics")).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("edgesync_watermarks_ignored_total{") and f'reason="{reason}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_a_forged_watermark_above_what_was_shipped_deletes_nothing(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    """No ingest runs, so nothing is committed. A forged KV value beyond every seq the
    bridge assigned, then one above what it shipped, are both ignored and counted;
    every record stays. A value within what was shipped is believed (the bridge cannot
    tell it from a real one) and trims exactly that far."""
    async with running_bridge(bridge_settings(tmp_path), nats_server.url) as bridge:
        epoch = await publish(bridge.url, "s", 100)
        await until(lambda: shipped(bridge, "s") == 100, timeout=15, message="not shipped")
        nc = await nats.connect(nats_server.url)
        try:
            kv = await nc.jetstream().key_value("ES_WATERMARKS")
            await kv.put(f"edge-1.s.{epoch}", b"1000")  # the forged write
            await until(lambda: ignored(bridge, "beyond_assigned"), timeout=10,
                        message="the forged watermark was not counted")
            assert (await bridge.buffer.stats()).records == 100

            await nats_server.stop()  # new records stay unshipped
            await publish(bridge.url, "s", 50)
            assert bridge.watermarks is not None
            await bridge.watermarks.apply("s", epoch, 120)  # 120 was assigned, not shipped
            assert await ignored(bridge, "above_shipped") == 1
            assert (await bridge.buffer.stats()).records == 150
            state = bridge.buffer.stream_state("s")
            assert state is not None and state.committed_seq == 0  # the trim floor
        finally:
            await nc.close()
        await bridge.watermarks.apply("s", epoch, 60)
        assert (await bridge.buffer.stats()).records == 90
        assert await ignored(bridge, "beyond_assigned") == 1  # counted once per value
