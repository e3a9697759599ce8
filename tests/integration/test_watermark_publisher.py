"""The ingest's watermark writes: the newest value of every key reaches the KV
bucket, and a write nobody stored is kept and written again; the ingest's metrics
count both."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError

from broker.protocol.topology import Topology
from broker.runtime.embedded_nats import EmbeddedNats
from cloud_ingest.direct_delivery import DeliveringClient
from cloud_ingest.metrics import IngestMetrics
from cloud_ingest.watermarks import WatermarkPublisher
from tests.support import until


@pytest.fixture(params=["nats-py", "direct"])
async def nc(nats_server: EmbeddedNats, request: pytest.FixtureRequest) -> AsyncIterator[NATS]:
    """nats-py's client, and the ingest's, whose puts' acks (and the 503 of a put
    nobody stored) reach the publisher directly (cloud_ingest.direct_delivery)."""
    if request.param == "direct":
        conn: NATS = DeliveringClient()
        await conn.connect(nats_server.url)
    else:
        conn = await nats.connect(nats_server.url)
    yield conn
    await conn.close()


def direct_deliveries(nc: NATS) -> int:
    return nc.direct_deliveries if isinstance(nc, DeliveringClient) else 0


def sample(metrics: IngestMetrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


@contextlib.asynccontextmanager
async def publishing(nc: NATS, topology: Topology, metrics: IngestMetrics | None = None
                     ) -> AsyncIterator[WatermarkPublisher]:
    publisher = WatermarkPublisher(nc, topology, interval_s=0.01, metrics=metrics)
    task = asyncio.create_task(publisher.publish_forever())
    try:
        yield publisher
    finally:
        publisher.begin_shutdown()
        await asyncio.wait_for(task, 10)


async def value(nc: NATS, topology: Topology, key: str) -> int | None:
    kv = await nc.jetstream().key_value(topology.watermarks_bucket)
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    return int(entry.value or b"0")


async def test_a_fleet_window_lands_every_key_at_its_newest_value(nc: NATS) -> None:
    topology = Topology(prefix="es")
    await topology.ensure_all(nc.jetstream())
    edges = 3_000  # more than one window of writes in flight
    metrics = IngestMetrics()
    async with publishing(nc, topology, metrics) as publisher:
        publisher.note([(f"e{i}", "t", 1, 5) for i in range(edges)])
        publisher.note([(f"e{i}", "t", 1, 9) for i in range(0, edges, 2)])
        publisher.note([("e1", "t", 1, 3)])  # older than what was noted: never written
        await until(lambda: publisher.published >= edges, timeout=30,
                    message="every key written once")
    assert await value(nc, topology, "e0.t.1") == 9
    assert await value(nc, topology, "e1.t.1") == 5
    assert await value(nc, topology, f"e{edges - 1}.t.1") == 5
    assert publisher.published == edges  # coalesced: one write per key
    # The publisher has stopped: every window's counts are in.
    assert sample(metrics, "edgesync_ingest_watermark_writes_total") == edges
    assert sample(metrics, "edgesync_ingest_watermark_write_failures_total") == 0
    assert sample(metrics, "edgesync_ingest_watermark_keys_pending") == 0
    if isinstance(nc, DeliveringClient):
        assert direct_deliveries(nc) >= edges  # every ack taken directly


async def test_a_write_nobody_stored_is_written_again(nc: NATS) -> None:
    topology = Topology(prefix="es")
    js = nc.jetstream()
    await topology.ensure_streams(js)  # no watermark bucket yet: the write has no responder
    metrics = IngestMetrics()
    async with publishing(nc, topology, metrics) as publisher:
        publisher.note([("edge-a", "t", 7, 42)])
        await until(lambda: (sample(metrics, "edgesync_ingest_watermark_write_failures_total")
                             or 0) > 0,
                    timeout=10, message="the unanswered write counted as failed")
        assert publisher.published == 0
        assert sample(metrics, "edgesync_ingest_watermark_writes_total") == 0
        if isinstance(nc, DeliveringClient):
            assert direct_deliveries(nc) >= 1  # the 503 (no responders), read directly
        await topology.ensure_watermark_bucket(js)
        await until(lambda: publisher.published == 1, timeout=10,
                    message="the kept write landed once the bucket exists")
    assert await value(nc, topology, "edge-a.t.7") == 42
    assert sample(metrics, "edgesync_ingest_watermark_writes_total") == 1
    assert sample(metrics, "edgesync_ingest_watermark_keys_pending") == 0
