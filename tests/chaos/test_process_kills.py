"""Processes of the pipeline killed under load: nothing acknowledged is lost or doubled."""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.chaos.harness import ChaosSystem, Load

pytestmark = pytest.mark.chaos


def assert_exact(outcome: object) -> None:
    assert outcome.lost == 0, outcome
    assert outcome.duplicated == 0, outcome


async def assert_reconciles_exactly(system: ChaosSystem, load: Load, scenario: str, *,
                                    timeout: float = 120.0, notes: str = "") -> None:
    """Once every acknowledged record is committed (or explained), none is lost or doubled."""
    recover = await system.quiesce(load, timeout=timeout)
    assert_exact(await system.reconcile(scenario, load, recover_s=recover, notes=notes))


@pytest.mark.chaos_ci
async def test_bridges_sigkilled_repeatedly_lose_and_double_nothing(system: ChaosSystem) -> None:
    """SIGKILL each bridge several times at random moments under load (so some kills
    land during a group commit) and restart it: every acked record is one row."""
    rng = random.Random(6)
    kills = 0
    async with Load(system) as load:
        await load.wait_acked(2_000)
        for _ in range(3):
            for bridge in system.bridges.values():
                await asyncio.sleep(rng.uniform(0.2, 1.5))  # the schedule
                bridge.kill()
                kills += 1
                await bridge.start()
                before = len(load.acked)
                await load.wait_acked(before + 500)
    await assert_reconciles_exactly(system, load, "bridge SIGKILL x6 under load",
                                    notes=f"{kills} kills")


@pytest.mark.chaos_ci
async def test_ingest_sigkilled_mid_transaction_loses_and_doubles_nothing(
    system: ChaosSystem,
) -> None:
    """SIGKILL an ingest process while it commits groups (the other keeps consuming),
    then the second too, and restart both: redelivered batches are absorbed."""
    rng = random.Random(7)
    async with Load(system) as load:
        await load.wait_acked(3_000)
        for ingest in system.ingests:
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            ingest.kill()
            await asyncio.sleep(1.0)  # the survivor carries the load alone
            await ingest.start()
        await load.wait_acked(len(load.acked) + 2_000)
    await assert_reconciles_exactly(system, load, "ingest SIGKILL mid-transaction")


async def test_nats_sigkilled_and_restarted_on_its_store_loses_nothing(
    system: ChaosSystem,
) -> None:
    """SIGKILL nats-server under load (its file store not synced) and restart it on
    the same store: what JetStream lost is retransmitted by the bridges."""
    async with Load(system) as load:
        await load.wait_acked(3_000)
        for _ in range(2):
            await system.nats.kill()
            await asyncio.sleep(2.0)  # an outage: the bridges keep buffering
            await system.nats.start()
            await load.wait_acked(len(load.acked) + 2_000, timeout=60)
    await assert_reconciles_exactly(system, load, "nats-server SIGKILL + restart x2",
                                    timeout=180)


async def test_postgres_immediate_shutdown_and_restart_loses_nothing(
    system: ChaosSystem,
) -> None:
    """PostgreSQL stopped in immediate mode (crash recovery on start) under load, and
    then SIGKILLed: the ingests hold their groups, retry, and resume."""
    async with Load(system) as load:
        await load.wait_acked(3_000)
        await system.pg.stop(mode="immediate")
        await asyncio.sleep(3.0)
        await system.pg.start()
        await load.wait_acked(len(load.acked) + 2_000, timeout=60)
        await system.pg.kill()
        await asyncio.sleep(2.0)
        await system.pg.start()
        await load.wait_acked(len(load.acked) + 2_000, timeout=60)
    await assert_reconciles_exactly(system, load, "PostgreSQL immediate stop + kill, restart",
                                    timeout=180)
