"""The ingest's watermark writes: the newest value of every key reaches the KV
bucket, one ack vouching for a run of puts, and a run nobody stored is kept and
written again; the ingest's metrics count both."""

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
from cloud_ingest.watermarks import _RUN_PUTS, WatermarkPublisher, _refusal
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
    edges = 3_000  # more than one run of puts
    metrics = IngestMetrics()
    replies_before = nc.stats["in_msgs"]
    async with publishing(nc, topology, metrics) as publisher:
        publisher.note([(f"e{i}", "t", 1, 5) for i in range(edges)])
        publisher.note([(f"e{i}", "t", 1, 9) for i in range(0, edges, 2)])
        publisher.note([("e1", "t", 1, 3)])  # older than what was noted: never written
        await until(lambda: publisher.published >= edges, timeout=30,
                    message="every key written once")
    # One window (noted before the publisher ran), in runs of _RUN_PUTS puts: one ack
    # for each run, not one for each put.
    assert nc.stats["in_msgs"] - replies_before == -(-edges // _RUN_PUTS)
    assert await value(nc, topology, "e0.t.1") == 9
    assert await value(nc, topology, "e1.t.1") == 5
    assert await value(nc, topology, f"e{edges - 1}.t.1") == 5
    assert publisher.published == edges  # coalesced: one write per key
    # The publisher has stopped: every window's counts are in.
    assert sample(metrics, "edgesync_ingest_watermark_writes_total") == edges
    assert sample(metrics, "edgesync_ingest_watermark_write_failures_total") == 0
    assert sample(metrics, "edgesync_ingest_watermark_keys_pending") == 0
    if isinstance(nc, DeliveringClient):
        assert direct_deliveries(nc) == -(-edges // _RUN_PUTS)  # every ack taken directly


async def test_a_run_nobody_stored_is_written_again(nc: NATS) -> None:
    topology = Topology(prefix="es")
    js = nc.jetstream()
    await topology.ensure_streams(js)  # no watermark bucket yet: the writes have no responder
    metrics = IngestMetrics()
    keys = 50  # one run: its acked put's 503 fails every write of it
    async with publishing(nc, topology, metrics) as publisher:
        publisher.note([(f"edge-{i}", "t", 7, 40 + i) for i in range(keys)])
        await until(lambda: (sample(metrics, "edgesync_ingest_watermark_write_failures_total")
                             or 0) >= keys,
                    timeout=10, message="the unanswered run counted as failed, write by write")
        assert publisher.published == 0
        assert sample(metrics, "edgesync_ingest_watermark_writes_total") == 0
        if isinstance(nc, DeliveringClient):
            assert direct_deliveries(nc) >= 1  # the 503 (no responders), read directly
        await topology.ensure_watermark_bucket(js)
        await until(lambda: publisher.published == keys, timeout=10,
                    message="the kept writes landed once the bucket exists")
    for i in (0, keys - 1):
        assert await value(nc, topology, f"edge-{i}.t.7") == 40 + i
    assert sample(metrics, "edgesync_ingest_watermark_writes_total") == keys
    assert sample(metrics, "edgesync_ingest_watermark_keys_pending") == 0


def test_only_an_ack_on_the_same_connection_vouches_for_a_run() -> None:
    ack = b'{"stream":"KV_ES_WATERMARKS","seq":7}'
    assert _refusal(ack, None, reconnected=False) is None
    # The run's first puts may have gone down with the old connection.
    assert _refusal(ack, None, reconnected=True) == "reconnected while the run was written"
    refused = b'{"error":{"code":503,"description":"JetStream resource limits exceeded"}}'
    assert _refusal(refused, None, reconnected=False) == refused.decode()
    assert _refusal(b"", "503", reconnected=False) == "503"  # no responders
    assert _refusal(b"", None, reconnected=False) == "no reply"
