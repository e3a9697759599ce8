"""A group that only repeats what is committed (a JetStream redelivery, an edge's
retransmit) changes no watermark, yet its edge may lack the watermark: a write of it
was lost, or the ingest stopped between its commit and the write. The writer reports
those keys' watermarks as ``repeated`` and the publisher writes them again, so a stream
that went quiet after such a loss does not keep its last batch for ever."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import nats
import pytest

from broker.protocol.topology import Topology
from broker.runtime.embedded_nats import EmbeddedNats
from broker.settings import ShipperSettings
from cloud_ingest.ingesting import init_connection
from cloud_ingest.watermarks import WatermarkPublisher
from cloud_ingest.writing import GroupWriter
from edge_bridge.bridge import Bridge
from edge_bridge.sdk import EdgeClient
from tests.integration.harness import (
    bridge_settings,
    buffered_is,
    running_bridge,
    running_ingest,
)
from tests.support import until
from tests.support.batches import json_batch_msg


@pytest.fixture
async def conn(migrated_conn: asyncpg.Connection) -> asyncpg.Connection:
    await init_connection(migrated_conn)
    return migrated_conn


async def test_a_group_that_only_repeats_reports_its_keys_watermarks(
    conn: asyncpg.Connection,
) -> None:
    gw = GroupWriter(Topology())
    first = await gw.write(conn, [gw.decode(json_batch_msg("e1", "s", 1, 1, 5)),
                                  gw.decode(json_batch_msg("e2", "s", 1, 1, 3))])
    assert sorted(first.watermarks) == [("e1", "s", 1, 5), ("e2", "s", 1, 3)]
    assert first.repeated == []
    for writer in (gw, GroupWriter(Topology())):  # the same process, and a restarted one
        again = await writer.write(conn, [
            writer.decode(json_batch_msg("e1", "s", 1, 1, 5)),  # all of it committed
            writer.decode(json_batch_msg("e2", "s", 1, 2, 4)),  # 2-3 committed, 4-5 new
            writer.decode(json_batch_msg("e3", "s", 1, 1, 2)),  # new
        ])
        if writer is gw:  # e2 and e3 move and are reported as before; e1 is repeated
            assert again.inserted == 4
            assert again.repeated == [("e1", "s", 1, 5)]
            assert sorted(again.watermarks) == [("e2", "s", 1, 5), ("e3", "s", 1, 2)]
        else:  # the same group once more, after a restart: all of it repeated
            assert again.inserted == 0 and again.watermarks == []
            assert again.repeated == [("e1", "s", 1, 5), ("e2", "s", 1, 5), ("e3", "s", 1, 2)]


async def test_a_repeated_watermark_is_written_again(nats_server: EmbeddedNats) -> None:
    topology = Topology(prefix="es")
    nc = await nats.connect(nats_server.url)
    try:
        await topology.ensure_all(nc.jetstream())
        publisher = WatermarkPublisher(nc, topology, interval_s=0.01)
        task = asyncio.create_task(publisher.publish_forever())
        try:
            publisher.note([("e1", "s", 1, 5)])
            await until(lambda: publisher.published == 1, timeout=10,
                        message="the watermark written")
            kv = await nc.jetstream().key_value(topology.watermarks_bucket)
            await kv.delete("e1.s.1")  # the write lost, as far as the edge can tell
            publisher.note([("e1", "s", 1, 5)])  # the same value: not written twice
            publisher.note([("e1", "s", 1, 5)], again=True)  # a repeat: written again
            await until(lambda: publisher.published == 2, timeout=10,
                        message="the repeated watermark written again")
            entry = await kv.get("e1.s.1")
            assert entry.value == b"5"
        finally:
            publisher.begin_shutdown()
            await asyncio.wait_for(task, 10)
        assert publisher.published == 2
    finally:
        await nc.close()


async def test_an_edge_whose_watermark_was_never_written_trims_once_the_ingest_returns(
    tmp_path: Path, nats_server: EmbeddedNats, conn: asyncpg.Connection, pg_dsn: str,
) -> None:
    """The records were committed by an ingest that stopped before it wrote their
    watermark (made here by writing them with a GroupWriter from a consumer of our
    own). The stream then goes quiet. The restarted ingest finds only what is
    committed, and the edge still learns the watermark, trims, and holds nothing."""
    settings = bridge_settings(tmp_path, shipper=ShipperSettings(
        linger_ms=2, retransmit_timeout_s=600.0))  # healed by the ingest, not a retransmit
    topology = Topology()
    async with running_bridge(settings, nats_server.url) as bridge:
        async with EdgeClient(bridge.url) as client:
            futures = [client.publish("s", {"i": i}) for i in range(20)]
            await client.flush()
        assert [f.result().seq for f in futures] == list(range(1, 21))
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()

            async def shipped() -> bool:
                info = await js.stream_info(topology.records_stream)
                return info.state.messages > 0 and await buffered_unshipped(bridge) == 0

            await until(shipped, timeout=15, message="the bridge never shipped")
            sub = await js.pull_subscribe(topology.records_wildcard, stream=topology.records_stream)
            msgs = await sub.fetch(100, timeout=5)
            gw = GroupWriter(topology)
            done = await gw.write(conn, [gw.decode(m) for m in msgs])
            assert done.inserted == 20
            await sub.unsubscribe()
        finally:
            await nc.close()
        assert await buffered_is(bridge, 20)  # committed, but the edge does not know
        async with running_ingest(pg_dsn, nats_server.url):
            await until(lambda: buffered_is(bridge, 0), timeout=20,
                        message="the edge never learned the watermark")
    assert await conn.fetchval("SELECT count(*) FROM v_records") == 20


async def buffered_unshipped(bridge: Bridge) -> int:
    return (await bridge.buffer.stats()).unshipped_records
