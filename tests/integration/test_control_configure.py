"""`bridge.configure` on a running bridge: batch size, linger and stream policy change
live - visible in the bridge's metrics and in how it ships - and survive a restart."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from broker.runtime.embedded_nats import EmbeddedNats
from edge_bridge.bridge import Bridge
from edge_bridge.sdk import EdgeClient
from tests.integration.control_harness import control_plane
from tests.integration.harness import running_bridge, wait_for_records


async def scrape(bridge: Bridge) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The bridge's /metrics, as {(sample name, sorted labels): value}."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{bridge.url}/metrics")).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def publish(bridge: Bridge, stream: str, n: int) -> None:
    async with EdgeClient(bridge.url, linger_ms=1) as client:
        for i in range(n):
            client.publish(stream, {"i": i})
        await client.flush()


async def test_configure_is_live_visible_in_metrics_and_survives_a_restart(
        tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str) -> None:
    """Before: 300 records ship in a handful of batches. After `batch_max_records=10`:
    300 more need at least 30. The config gauges show the new values, and the same
    values come back after the bridge restarts from its buffer directory."""
    async with control_plane(tmp_path, nats_server.url, pg_dsn) as plane:
        settings = plane.bridge_settings()
        async with running_bridge(settings, nats_server.url) as bridge:
            await plane.wait_edge("edge-1")
            before = await scrape(bridge)
            assert before[("edgesync_bridge_config_batch_max_records", ())] == 2000
            await publish(bridge, "telemetry", 300)
            await wait_for_records(pg_dsn, 300)
            batches = (await scrape(bridge))[("edgesync_batches_shipped_total", ())]
            assert batches <= 20  # the SDK's own batching bounds it; 2000/batch is not the limit

            command_id = await plane.issue("edge-1", "bridge.configure", {
                "batch_max_records": 10, "linger_ms": 0,
                "streams": {"alarms": {"priority": 7, "overflow": "drop_oldest"}},
                "heartbeat_interval_s": 0.25,
            })
            applied = await plane.wait_status(command_id)
            assert applied["result"]["batch_max_records"] == 10
            assert applied["result"]["streams"]["alarms"] == {
                "overflow": "drop_oldest", "priority": 7, "ttl_s": None}
            after = await scrape(bridge)
            assert after[("edgesync_bridge_config_batch_max_records", ())] == 10
            assert after[("edgesync_bridge_config_linger_seconds", ())] == 0
            assert after[("edgesync_stream_policy_priority", (("stream", "alarms"),))] == 7
            assert after[("edgesync_stream_policy_overflow",
                          (("overflow", "drop_oldest"), ("stream", "alarms")))] == 1
            assert after[("edgesync_bridge_config_changes_total", ())] == 1

            await publish(bridge, "telemetry", 300)
            await wait_for_records(pg_dsn, 600)
            shipped = (await scrape(bridge))[("edgesync_batches_shipped_total", ())]
            assert shipped - batches >= 30  # 300 records at <= 10 per batch

        # Restart: the environment says 2000, the persisted change says 10.
        assert settings.shipper.batch_max_records == 2000  # the caller's copy is untouched
        async with running_bridge(settings, nats_server.url) as bridge:
            again = await scrape(bridge)
            assert again[("edgesync_bridge_config_batch_max_records", ())] == 10
            assert again[("edgesync_stream_policy_priority", (("stream", "alarms"),))] == 7
            assert bridge.settings.policy_for("alarms").overflow == "drop_oldest"
            assert bridge.settings.heartbeat_interval_s == 0.25
            await publish(bridge, "telemetry", 100)
            await wait_for_records(pg_dsn, 700)
            # A fresh process-level counter: 100 records at <= 10 per batch.
            assert (await scrape(bridge))[("edgesync_batches_shipped_total", ())] >= 10
