"""JetStream's state lost while the pipeline runs: the store wiped, or put back from
an older copy. The cloud recreates what it owns, and every acknowledged record ends
in PostgreSQL exactly once without restarting anything."""

from __future__ import annotations

import shutil

import pytest

from tests.chaos.harness import ChaosSystem, Load
from tests.chaos.test_process_kills import assert_reconciles_exactly

pytestmark = pytest.mark.chaos


async def test_nats_store_wiped_under_load_recovers_without_restarts(
    system: ChaosSystem,
) -> None:
    """nats-server stopped, its store deleted, started empty on the same port while the
    ingests and the bridges keep running: the streams, the watermark bucket and the
    durable consumers come back and every acknowledged record commits exactly once."""
    async with Load(system) as load:
        await load.wait_acked(3_000)
        await system.nats.kill()
        shutil.rmtree(system.nats.store_dir)
        system.nats.store_dir.mkdir()
        await system.nats.start()
        await load.wait_acked(len(load.acked) + 3_000, timeout=60)
    await assert_reconciles_exactly(system, load, "NATS store wiped under load",
                                    timeout=90, notes="no process restarted")
    logs = "".join((system.tmp / f"ingest-{i}.log").read_text() for i in range(2))
    assert '"topology_recreated"' in logs


async def test_nats_store_put_back_from_an_older_copy_under_load_recovers(
    system: ChaosSystem,
) -> None:
    """nats-server stopped, its store replaced by a copy taken earlier in the run (an
    operator restoring yesterday's backup): the streams, the watermark bucket and the
    consumers all go back in time at once (records the ingest already committed are
    delivered again, acknowledged batches published since the copy are gone, the
    watermarks are older than what the edges know). Nothing is restarted; every
    acknowledged record commits exactly once."""
    copy = system.tmp / "nats-store-copy"
    async with Load(system) as load:
        await load.wait_acked(2_000)
        await system.nats.kill()
        shutil.copytree(system.nats.store_dir, copy)
        await system.nats.start()
        await load.wait_acked(len(load.acked) + 3_000, timeout=60)
        await system.nats.kill()
        shutil.rmtree(system.nats.store_dir)
        shutil.copytree(copy, system.nats.store_dir)
        await system.nats.start()
        await load.wait_acked(len(load.acked) + 3_000, timeout=60)
    await assert_reconciles_exactly(system, load, "NATS store put back from an older copy",
                                    timeout=90, notes="no process restarted")
