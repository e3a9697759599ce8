"""A fleet past nats-server's default of 1,000 consumers per stream: every edge gets its
control consumer (nats-server 2.15 caps a stream that does not set its own limit)."""

from __future__ import annotations

import asyncio

import nats

from broker.protocol.topology import Topology
from broker.runtime.embedded_nats import EmbeddedNats

EDGES = 1_001


async def test_the_control_stream_takes_a_consumer_per_edge_past_one_thousand(
        nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        topology = Topology()
        await topology.ensure_all(js)
        edges = iter(range(EDGES))

        async def create() -> None:
            for i in edges:
                await js.add_consumer(topology.control_stream,
                                      topology.control_consumer_config(f"edge-{i:04d}"))

        await asyncio.gather(*(create() for _ in range(16)))
        info = await js.stream_info(topology.control_stream)
        assert info.state.consumer_count == EDGES
    finally:
        await nc.close()


async def test_an_existing_control_stream_is_given_the_limit(nats_server: EmbeddedNats) -> None:
    """A stream made before the limit was set (max_consumers unset) is updated by the
    owner's step, as any other drift from the topology is."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        topology = Topology()
        configs = topology.stream_configs()
        for config in configs:
            if config.name == topology.control_stream:
                config.max_consumers = None
            await js.add_stream(config)
        await topology.ensure_all(js)
        info = await js.stream_info(topology.control_stream)
        assert info.config.max_consumers == topology.control_max_consumers
    finally:
        await nc.close()
