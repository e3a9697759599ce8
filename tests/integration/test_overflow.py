"""A full edge buffer: 'block' back-pressures producers, 'drop_oldest' drops and counts."""

from __future__ import annotations

from pathlib import Path

import httpx
import nats

from broker.protocol.events import Heartbeat, decode_event
from broker.runtime.embedded_nats import EmbeddedNats
from broker.settings import StreamPolicy
from edge_bridge.sdk import EdgeClient
from tests.helpers import until
from tests.integration.harness import (
    bridge_settings,
    count_records,
    running_bridge,
    running_ingest,
    wait_for_records,
)

CAP = 64 * 1024
PAYLOAD = "x" * 400  # ~440 bytes per record in the buffer: ~150 records fill the cap


async def test_block_policy_back_pressures_the_sdk_until_space_frees(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """With NATS down the buffer fills; the ingress answers 503 + Retry-After, the SDK
    keeps its records pending (nothing lost, nothing dropped) and delivers them once
    the bridge drains."""
    await nats_server.stop()
    settings = bridge_settings(tmp_path, buffer_max_bytes=CAP)
    async with running_bridge(settings, nats_server.url) as bridge, EdgeClient(
        bridge.url, linger_ms=1, batch_max_records=20, retry_timeout_s=60
    ) as client:
        futures = [client.publish("s", {"i": i, "pad": PAYLOAD}) for i in range(400)]
        await until(lambda: client.stats.retries > 0, timeout=15,
                    message="the SDK never met back-pressure")
        async with httpx.AsyncClient(base_url=bridge.url) as http:
            resp = await http.post("/v1/streams/s/records",
                                   json={"records": [{"payload": PAYLOAD}] * 20})
        assert resp.status_code == 503
        assert resp.json()["error"] == "buffer_full"
        assert int(resp.headers["Retry-After"]) >= 1
        stats = await bridge.buffer.stats()
        assert stats.bytes <= CAP
        assert stats.dropped["s"]["overflow"] == 0
        assert not all(f.done() for f in futures)
        await nats_server.restart()
        async with running_ingest(pg_dsn, nats_server.url):
            await client.flush()
            assert all(f.result().stream == "s" for f in futures)
            await wait_for_records(pg_dsn, 400, timeout=60)


async def test_drop_oldest_drops_the_oldest_and_heartbeats_count_every_drop(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """With 'drop_oldest', producers are never refused; the oldest records go, and
    records committed + records dropped (as the heartbeat reports) = records sent."""
    await nats_server.stop()
    settings = bridge_settings(
        tmp_path, buffer_max_bytes=CAP,
        default_policy=StreamPolicy(overflow="drop_oldest"),
    )
    sent = 600
    async with running_bridge(settings, nats_server.url) as bridge:
        async with EdgeClient(bridge.url, linger_ms=1, batch_max_records=20) as client:
            futures = [client.publish("s", {"i": i, "pad": PAYLOAD}) for i in range(sent)]
            await client.flush()
            assert all(f.result() for f in futures)  # nobody was refused
        stats = await bridge.buffer.stats()
        dropped = stats.dropped["s"]["overflow"]
        assert dropped > 0 and stats.records + dropped == sent
        runs = await bridge.buffer.read_runs("s", 0, max_records=sent, max_bytes=10**9)
        assert runs[0].first_seq == dropped + 1  # the oldest went first
        assert runs[-1].last_seq == sent

        await nats_server.restart()
        nc = await nats.connect(nats_server.url)
        beats: list[Heartbeat] = []

        async def on_beat(msg: nats.aio.msg.Msg) -> None:
            event = decode_event(msg.data)
            if isinstance(event, Heartbeat):  # drop markers share the subject
                beats.append(event)

        await nc.subscribe("es.evt.edge-1", cb=on_beat)
        try:
            async with running_ingest(pg_dsn, nats_server.url):
                await wait_for_records(pg_dsn, sent - dropped, timeout=60)
                await until(lambda: beats, timeout=15, message="no heartbeat")
        finally:
            await nc.close()
        assert beats[-1].dropped["s"] == {"overflow": dropped, "ttl": 0}
        assert await count_records(pg_dsn) + dropped == sent
        assert beats[-1].streams["s"].dropped_overflow == dropped
