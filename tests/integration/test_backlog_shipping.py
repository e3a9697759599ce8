"""Shipping a long outage's backlog: streams of one priority take turns."""

from __future__ import annotations

from pathlib import Path

import nats
from nats.aio.msg import Msg

from broker.protocol.wire import CT_RAW, Record
from broker.runtime.embedded_nats import EmbeddedNats
from broker.settings import ShipperSettings, StreamPolicy
from edge_bridge.buffer import Buffer, encode_chunks
from tests.helpers import until
from tests.integration.harness import bridge_settings, running_bridge

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
