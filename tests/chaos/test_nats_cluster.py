"""A 3-node JetStream cluster (streams with 3 replicas) losing a node, then the leader."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from broker.runtime.embedded_nats import EmbeddedNats
from tests.chaos.harness import ChaosSystem, Load
from tests.helpers import until
from tests.support import port_for_config


class NatsCluster:
    """Three nats-server processes on loopback, routed into one JetStream cluster."""

    def __init__(self, tmp: Path, size: int = 3) -> None:
        # Each node's command line names every node's route port: chosen in advance.
        client_ports = [port_for_config() for _ in range(size)]
        route_ports = [port_for_config() for _ in range(size)]
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in route_ports)
        self.nodes = [
            EmbeddedNats(
                tmp / f"nats-{i}", port=client_ports[i], log_file=tmp / f"nats-{i}.log",
                extra_args=["-n", f"n{i}", "--cluster_name", "es",
                            "--cluster", f"nats://127.0.0.1:{route_ports[i]}",
                            "--routes", routes],
            )
            for i in range(size)
        ]
        self.url = ",".join(n.url for n in self.nodes)

    async def start(self) -> None:
        await asyncio.gather(*(n.start() for n in self.nodes))

        async def jetstream_ready() -> bool:
            try:
                nc = await nats.connect(self.url.split(","), connect_timeout=1)
            except Exception:
                return False
            try:
                await nc.jetstream().account_info()
                return True
            except Exception:
                return False
            finally:
                await nc.close()

        await until(jetstream_ready, timeout=30, interval=0.2,
                    message="the JetStream cluster elected no meta leader")

    async def stop(self) -> None:
        await asyncio.gather(*(n.stop() for n in self.nodes))

    async def leader_of(self, stream: str) -> EmbeddedNats:
        nc = await nats.connect(self.url.split(","))
        try:
            info = await nc.jetstream().stream_info(stream)
        finally:
            await nc.close()
        assert info.config.num_replicas == len(self.nodes), "the stream is not replicated"
        assert info.cluster is not None and info.cluster.leader
        return self.nodes[int(info.cluster.leader.removeprefix("n"))]


class ClusteredSystem(ChaosSystem):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.cluster = NatsCluster(tmp)
        self.nats = self.cluster  # type: ignore[assignment]  # duck-typed: start, stop, url


@pytest.fixture
async def clustered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                    ) -> AsyncIterator[ClusteredSystem]:
    # Every bridge and ingest creates R3 streams and an R3 watermark bucket.
    monkeypatch.setenv("EDGESYNC_NATS__REPLICAS", "3")
    system = ClusteredSystem(tmp_path)
    try:
        await system.start()
        yield system
    finally:
        await system.close()


async def test_a_jetstream_cluster_losing_a_node_then_the_leader_loses_nothing(
    clustered: ClusteredSystem,
) -> None:
    """Under load, SIGKILL one follower node and restart it, then SIGKILL the leader of
    the records stream and restart it: every acknowledged record is one row."""
    system, cluster = clustered, clustered.cluster
    async with Load(system) as load:
        await load.wait_acked(2_000)
        leader = await cluster.leader_of("ES_RECORDS")
        follower = next(n for n in cluster.nodes if n is not leader)
        await follower.kill()
        await load.wait_acked(len(load.acked) + 2_000, timeout=60)
        await follower.restart()
        leader = await cluster.leader_of("ES_RECORDS")
        await leader.kill()  # the stream must elect a new leader and go on
        await load.wait_acked(len(load.acked) + 2_000, timeout=90)
        await leader.restart()
        await load.wait_acked(len(load.acked) + 1_000, timeout=60)
    recover = await system.quiesce(load, timeout=180)
    outcome = await system.reconcile(
        "3-node JetStream cluster (R3): a follower, then the leader SIGKILLed", load,
        recover_s=recover,
    )
    assert outcome.lost == 0, outcome
    assert outcome.duplicated == 0, outcome
