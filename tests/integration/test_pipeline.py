"""The data path end to end: SDK -> bridge -> JetStream -> ingest -> PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

from broker.pg_connecting import connected
from broker.runtime.embedded_nats import EmbeddedNats
from edge_bridge.sdk import EdgeClient, RecordAck
from tests.integration.harness import (
    bridge_settings,
    running_bridge,
    running_ingest,
    wait_for_records,
)

STREAMS = ("telemetry", "alarms", "audit")
BASE_TS_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z


async def publish_all(url: str, edge: str, n: int) -> dict[tuple[str, str, int, int], tuple]:
    """Publish n records spread over STREAMS; returns identity -> (payload, key, ts_us)."""
    sent: list[tuple[asyncio.Future[RecordAck], dict[str, object], str, int]] = []
    async with EdgeClient(url, linger_ms=2) as client:
        for i in range(n):
            payload = {"edge": edge, "i": i, "v": i * 0.5, "tags": {"even": i % 2 == 0}}
            key = f"dev-{i % 17}"
            ts_us = BASE_TS_US + i
            fut = client.publish(
                STREAMS[i % 3], payload, key=key, ts=datetime.fromtimestamp(ts_us / 1e6, UTC)
            )
            sent.append((fut, payload, key, ts_us))
        await client.flush()
    out = {}
    for fut, payload, key, ts_us in sent:
        ack = fut.result()
        out[(edge, ack.stream, ack.epoch, ack.seq)] = (payload, key, ts_us)
    return out


async def test_100k_records_across_3_streams_and_2_edges_arrive_exactly_once(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """Every acknowledged record is one row with its payload, key and event time."""
    per_edge = 50_000
    async with (
        running_ingest(pg_dsn, nats_server.url),
        running_bridge(bridge_settings(tmp_path, "edge-a"), nats_server.url) as a,
        running_bridge(bridge_settings(tmp_path, "edge-b"), nats_server.url) as b,
    ):
        sent_a, sent_b = await asyncio.gather(
            publish_all(a.url, "edge-a", per_edge), publish_all(b.url, "edge-b", per_edge)
        )
        expected = sent_a | sent_b
        assert len(expected) == 2 * per_edge
        await wait_for_records(pg_dsn, 2 * per_edge, timeout=90)
    async with connected(pg_dsn) as conn:
        rows = await conn.fetch(
            "SELECT edge_id, stream, epoch, seq, payload::text, key, "
            "(extract(epoch FROM event_time) * 1000000)::bigint AS ts_us FROM v_records"
        )
        ranges = await conn.fetch(
            "SELECT edge_id, stream, committed_records, "
            "committed_watermark, highest_seq FROM v_stream_progress"
        )
    got = {
        (r["edge_id"], r["stream"], r["epoch"], r["seq"]): (
            json.loads(r["payload"]),
            r["key"],
            r["ts_us"],
        )
        for r in rows
    }
    assert len(rows) == len(got) == 2 * per_edge
    assert got == expected
    # Seqs are dense per stream, so every stream's committed range is one interval.
    assert len(ranges) == 6
    for r in ranges:
        assert r["committed_records"] == r["committed_watermark"] == r["highest_seq"]
