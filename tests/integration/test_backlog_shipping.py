"""Shipping a long outage's backlog: streams of one priority take turns."""

from __future__ import annotations

import shutil
from pathlib import Path

import nats
from nats.aio.msg import Msg

from broker.protocol.wire import CT_RAW, Record
from broker.runtime.embedded_nats import EmbeddedNats
from broker.settings import ShipperSettings, StreamPolicy
from edge_bridge.buffer import Buffer, encode_chunks
from tests.helpers import until
from tests.integration.harness import (
    bridge_settings,
    buffered_is,
    count_records,
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
