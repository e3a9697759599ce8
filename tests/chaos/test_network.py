"""The network between a bridge and NATS degraded, silenced, refused and cut."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.chaos.harness import ChaosSystem, Load, chaos_system
from tests.chaos.proxy import ChaosProxy
from tests.helpers import until


@pytest.fixture
async def proxied(tmp_path: Path) -> AsyncIterator[tuple[ChaosSystem, ChaosProxy]]:
    """The default system, with edge-a reaching NATS only through a ChaosProxy."""
    holder: list[ChaosSystem] = []
    proxy = ChaosProxy(lambda: holder[0].nats.port)
    await proxy.start()  # port 0: the bridge is told proxy.url
    try:
        env = {"edge-a": {"EDGESYNC_NATS__URL": proxy.url}}
        async with chaos_system(tmp_path, bridge_env=env) as system:
            holder.append(system)
            yield system, proxy
    finally:
        await proxy.close()


async def test_partitions_and_degradation_between_a_bridge_and_nats(
    proxied: tuple[ChaosSystem, ChaosProxy],
) -> None:
    """Latency, a blackhole (silence), refused connections and messages cut in the
    middle between edge-a and NATS: edge-a buffers, reconnects and drains; every
    acknowledged record of both edges is one row."""
    system, proxy = proxied
    async with Load(system) as load:
        await load.wait_acked(2_000)
        proxy.set_mode("pass", latency_s=0.2)  # a slow satellite link
        await asyncio.sleep(3)
        proxy.set_mode("blackhole")  # silence: only pings reveal it
        await asyncio.sleep(6)
        proxy.set_mode("pass")
        before = len([i for i in load.acked if i[0] == "edge-a"])
        await until(lambda: len([i for i in load.acked if i[0] == "edge-a"]) > before + 200,
                    timeout=60, message="edge-a stopped accepting after the blackhole")
        proxy.set_mode("drop")  # connection refused
        await asyncio.sleep(3)
        proxy.set_mode("pass")
        for _ in range(3):  # cut mid-message
            before = proxy.connections
            proxy.cut()
            await until(lambda before=before: proxy.connections > before, timeout=60,
                        message="edge-a did not reconnect after a cut")
        await load.wait_acked(len(load.acked) + 1_000, timeout=60)
    recover = await system.quiesce(load, timeout=180)
    outcome = await system.reconcile(
        "network: latency, blackhole, refused, cut (bridge <-> NATS)", load,
        recover_s=recover, notes=f"{proxy.connections} proxied connections",
    )
    assert outcome.lost == 0, outcome
    assert outcome.duplicated == 0, outcome
    edge_a = [i for i in load.acked if i[0] == "edge-a"]
    assert edge_a, "edge-a acknowledged nothing"
