"""Shipping a long outage's backlog: streams of one priority take turns."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import nats
from nats.aio.msg import Msg

from broker.protocol.topology import Topology
from broker.protocol.wire import CT_RAW, Record
from broker.runtime.embedded_nats import EmbeddedNats
from broker.settings import ShipperSettings, StreamPolicy
from edge_bridge.buffer import Buffer, encode_chunks
from edge_bridge.metrics import BridgeMetrics
from edge_bridge.shipping import Shipper
from tests.chaos.proxy import ChaosProxy
from tests.helpers import until
from tests.integration.harness import (
    bridge_settings,
    buffered_is,
    count_records,
    init_topology,
    running_bridge,
    running_ingest,
    wait_for_records,
)

STREAMS = ("a", "b", "c")
BATCHES_EACH = 60


async def test_streams_of_one_priority_ship_their_backlogs_in_turn(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    """Three streams of one priority each hold 60 batches' worth when the link
    returns: they ship in turn, so within the first 12 batches every stream has
    shipped (docs: "ties ship round-robin"); before, the first stream's whole backlog
    went first and a stream under steady load could keep the others waiting for ever."""
    settings = bridge_settings(tmp_path, shipper=ShipperSettings(
        linger_ms=1, max_in_flight=2, batch_max_records=100))
    chunks = encode_chunks([Record(1, CT_RAW, b"x" * 50) for _ in range(100)])
    async with Buffer(settings.buffer_dir, max_bytes=settings.buffer_max_bytes,
                      policy_for=lambda s: StreamPolicy()) as buf:
        for stream in STREAMS:
            for _ in range(BATCHES_EACH):
                await buf.append(stream, chunks)
    order: list[str] = []

    async def seen(msg: Msg) -> None:
        order.append(msg.subject.rsplit(".", 1)[1])

    nc = await nats.connect(nats_server.url)
    try:
        await nc.subscribe("es.rec.edge-1.>", cb=seen)
        await nc.flush()
        async with running_bridge(settings, nats_server.url):
            await until(lambda: len(order) >= len(STREAMS) * BATCHES_EACH, timeout=60,
                        message="the backlog was not shipped")
    finally:
        await nc.close()
    first = order[:12]
    assert set(first) == set(STREAMS), f"first batches shipped: {first}"
    assert sorted(order) == sorted(s for s in STREAMS for _ in range(BATCHES_EACH))


WINDOW = 1024**2
BACKLOG_RECORDS = 200_000  # ~22 MiB charged


async def test_with_the_ingest_down_a_backlog_ships_one_window_per_retransmission(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """NATS is up, the ingest is down, a 22 MiB backlog waits: the shipper ships
    max_unconfirmed_bytes (1 MiB) and waits for commits, and each retransmission
    round ships that window again (before: the whole backlog went out at once and
    again every round, ~22 MiB each time, for as long as the ingest stayed down).
    When the ingest returns, every record is committed once and the buffer empties."""
    settings = bridge_settings(tmp_path, shipper=ShipperSettings(
        linger_ms=1, retransmit_timeout_s=1, retransmit_backoff_max_s=2,
        max_unconfirmed_bytes=WINDOW))
    chunks = encode_chunks([Record(1, CT_RAW, b"x" * 80) for _ in range(1_000)])
    async with Buffer(settings.buffer_dir, max_bytes=settings.buffer_max_bytes,
                      policy_for=lambda s: StreamPolicy()) as buf:
        for i in range(BACKLOG_RECORDS // 1_000):
            await buf.append(f"s{i % 4}", chunks)
    nc = await nats.connect(nats_server.url)
    try:
        async with running_bridge(settings, nats_server.url) as bridge:
            js = nc.jetstream()
            # Three retransmission rounds at least (timeout 1 s, then 2 s).
            await until(lambda: bridge.metrics.retransmissions._value.get() >= 3,
                        timeout=30, message="no retransmission")
            shipped = (await js.stream_info("ES_RECORDS")).state.bytes
            rounds = int(bridge.metrics.retransmissions._value.get())
            print(f"\n{shipped >> 10} KiB in ES_RECORDS after {rounds} retransmissions")
            # The first window plus one per round (a round may start one read over).
            assert shipped < (rounds + 1) * (WINDOW + 600 * 1024)
            async with running_ingest(pg_dsn, nats_server.url):
                await wait_for_records(pg_dsn, BACKLOG_RECORDS, timeout=120)
                await until(lambda: buffered_is(bridge, 0), timeout=30,
                            message="the buffer did not empty")
    finally:
        await nc.close()


async def test_a_bridge_restarted_behind_the_clouds_watermark_ships_past_the_window(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """A bridge that restarts from a buffer the cloud had already committed in full
    (killed before its trims were written, or a restored copy of its disk) cannot
    apply the cloud's watermark until it has shipped that far again. The
    max_unconfirmed_bytes window must not wait for that watermark (it would wait for
    ever, the buffer never emptying): the backlog is shipped again past the window,
    absorbed by the ingest, then trimmed; every record is still stored once."""
    settings = bridge_settings(tmp_path, shipper=ShipperSettings(
        linger_ms=1, batch_max_bytes=64 * 1024, max_unconfirmed_bytes=256 * 1024))
    chunks = encode_chunks([Record(1, CT_RAW, b"x" * 80) for _ in range(1_000)])
    async with Buffer(settings.buffer_dir, max_bytes=settings.buffer_max_bytes,
                      policy_for=lambda s: StreamPolicy()) as buf:
        for i in range(20):
            await buf.append(f"s{i % 2}", chunks)
    before = tmp_path / "before-shipping"
    shutil.copytree(settings.buffer_dir, before)
    async with running_ingest(pg_dsn, nats_server.url):
        async with running_bridge(settings, nats_server.url) as bridge:
            await wait_for_records(pg_dsn, 20_000, timeout=60)
            await until(lambda: buffered_is(bridge, 0), timeout=30,
                        message="the first bridge did not trim")
        shutil.rmtree(settings.buffer_dir)
        shutil.copytree(before, settings.buffer_dir)
        async with running_bridge(settings, nats_server.url) as bridge:
            await until(lambda: buffered_is(bridge, 0), timeout=60,
                        message="the restarted bridge never got past the window")
    assert await count_records(pg_dsn) == 20_000


async def test_a_commit_seen_while_a_retransmitted_batch_is_in_flight_frees_its_room(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    """A retransmission round ships a batch again; while that copy is in flight the first
    copy commits (the follower trims and tells the shipper). Once the copy is acked,
    nothing of the stream awaits the cloud: the window holds no bytes. Before, the
    copy's bytes held the window until a spurious retransmission round, which also
    doubled the stream's retransmit timeout. The link
    to a real nats-server runs through a proxy that delays it, so the copy stays in
    flight long enough to be overtaken."""
    await init_topology(nats_server.url)
    proxy = ChaosProxy(lambda: nats_server.port)
    await proxy.start()
    nc = await nats.connect(proxy.url)
    settings = ShipperSettings(linger_ms=0, retransmit_timeout_s=0.3,
                               retransmit_backoff_max_s=600)
    try:
        async with Buffer(tmp_path / "buffer", max_bytes=64 * 1024**2,
                          policy_for=lambda s: StreamPolicy()) as buf:
            await buf.append("s", encode_chunks([Record(1, CT_RAW, b"x" * 80)] * 100))
            metrics = BridgeMetrics("edge-1")
            shipper = Shipper(buf, edge_id="edge-1", topology=Topology(), settings=settings,
                              policy_for=lambda s: StreamPolicy(), metrics=metrics,
                              publish_timeout_s=5.0)
            shipper.attach(nc.jetstream())
            shipping = asyncio.create_task(shipper.run_forever())
            try:
                state = buf.stream_state("s")
                assert state is not None
                await until(lambda: shipper.shipped_high("s", state.epoch) >= 100,
                            message="the batch was never shipped")
                proxy.set_mode("pass", latency_s=1.0)  # the copy's ack comes 1-2 s late
                retransmitted = metrics.retransmissions._value  # type: ignore[attr-defined]
                await until(lambda: retransmitted.get() == 1, timeout=10,
                            message="no retransmission round")
                await buf.trim("s", state.epoch, 100)  # the first copy commits
                shipper.on_committed("s", state.epoch, 100)
                shipped = metrics.batches_shipped._value  # type: ignore[attr-defined]
                await until(lambda: shipped.get() == 2, timeout=10,
                            message="the copy was never acked")
                assert shipper.unconfirmed_bytes == 0
            finally:
                shipper.begin_shutdown()
                await shipping
    finally:
        await nc.close()
        await proxy.close()
