"""Edge-side and input faults under load: disk pressure, poison batches, clock skew."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import asyncpg
import nats
import pytest

from broker.protocol.wire import CT_JSON, Batch, Record, encode_batch
from tests.chaos.harness import ChaosSystem, Load, chaos_system
from tests.helpers import until

pytestmark = pytest.mark.chaos

CAP = 256 * 1024  # bytes: ~2k records of the load fill it within a second


def assert_exact(outcome: object) -> None:
    assert outcome.lost == 0, outcome
    assert outcome.duplicated == 0, outcome


async def test_buffer_cap_under_block_and_drop_oldest_loses_nothing_unexplained(
    tmp_path: Path,
) -> None:
    """NATS is down long enough for both bridges to reach their byte cap: the `block`
    edge back-pressures its producer (nothing acked is lost), the `drop_oldest` edge
    deletes its oldest records, and every acked record missing from PostgreSQL is
    covered by a drop marker."""
    policies = {
        "edge-a": {"EDGESYNC_BRIDGE__BUFFER_MAX_BYTES": str(CAP)},
        "edge-b": {
            "EDGESYNC_BRIDGE__BUFFER_MAX_BYTES": str(CAP),
            "EDGESYNC_BRIDGE__DEFAULT_POLICY": json.dumps({"overflow": "drop_oldest"}),
        },
    }
    async with chaos_system(tmp_path, bridge_env=policies) as system:
        async with Load(system) as load:
            await load.wait_acked(2_000)
            await system.nats.kill()
            await asyncio.sleep(5.0)  # ~10k records offered per edge: far past the cap
            await system.nats.start()
            await load.wait_acked(len(load.acked) + 2_000, timeout=60)
        recover = await system.quiesce(load, timeout=120)

        async def reported_drops() -> dict[str, int]:
            rows = await system._fetch(
                "SELECT edge_id, sum(dropped_overflow)::int8 AS n FROM v_completeness "
                "GROUP BY edge_id"
            )
            found = {r["edge_id"]: r["n"] for r in rows}
            return found if found.get("edge-b") else {}

        # Drops may hit records already committed (drop_oldest takes shipped ones
        # too), so the proof the cap was reached is the edge's own drop report.
        drops = await until(reported_drops, timeout=30, message="edge-b reported no drops")
        outcome = await system.reconcile(
            "buffer cap: block + drop_oldest", load, recover_s=recover,
            notes=f"cap 256 KiB, NATS down 5 s; edge-a block, edge-b drop_oldest "
            f"dropped {drops['edge-b']} (reported)",
        )
    assert_exact(outcome)
    assert not drops.get("edge-a"), "a block stream dropped records"


async def test_poison_batch_is_dead_lettered_while_the_rest_flows(system: ChaosSystem) -> None:
    """A batch with a valid envelope whose payloads PostgreSQL would refuse (JSON text
    with \\u0000): each record lands in dead_letters with its identity and reason,
    its seqs are accounted (the watermark passes them); the load around it commits."""
    async with Load(system) as load:
        await load.wait_acked(2_000)
        nc = await nats.connect(system.nats.url)
        try:
            js = nc.jetstream()
            poison = Batch(1, "edge-a", "poison", 4242, 1,
                           [Record(0, CT_JSON, b'{"bad": "\\u0000"}') for _ in range(3)])
            data, _ = encode_batch(poison)
            await js.publish("es.rec.edge-a.poison", data)
        finally:
            await nc.close()
        await load.wait_acked(len(load.acked) + 2_000)
    recover = await system.quiesce(load)

    async def dead_lettered() -> list[asyncpg.Record]:
        return await system._fetch("SELECT seq, reason FROM dead_letters ORDER BY seq")

    rows = await until(dead_lettered, timeout=15, message="poison batch not dead-lettered")
    outcome = await system.reconcile("poison batch dead-lettered", load, recover_s=recover,
                                     notes=f"dead letters: {len(rows)}, one per record")
    assert_exact(outcome)
    assert [r["seq"] for r in rows] == [1, 2, 3]
    assert all("\\u0000" in r["reason"] for r in rows), rows
    assert await system._fetch("SELECT 1 FROM v_records WHERE stream='poison'") == []
    progress = await system._fetch(
        "SELECT watermark FROM v_completeness WHERE stream = 'poison'")
    assert progress[0]["watermark"] == 3


async def test_skewed_edge_clocks_keep_event_time_and_seq_order(system: ChaosSystem) -> None:
    """Producers on edge-a run 3 h fast, on edge-b 5 h slow: their records are all
    accepted, seq follows publish order, event_time is kept as sent and received_at
    comes from the cloud's clock."""
    skew = {"edge-a": 3 * 3600.0, "edge-b": -5 * 3600.0}
    system.skew_s.update(skew)
    started = time.time()
    # One request in flight per producer: with several, two batches of a stream may be
    # stored in either order (EdgeClient's docstring), which made this test flaky.
    async with Load(system, ordered=True) as load:
        await load.wait_acked(6_000)
    recover = await system.quiesce(load)
    finished = time.time()
    outcome = await system.reconcile("clock skew +3 h / -5 h", load, recover_s=recover)
    assert_exact(outcome)
    rows = await system._fetch(
        "SELECT edge_id, stream, epoch, seq, payload->>'uid' AS uid, "
        "extract(epoch FROM event_time)::float8 AS ev, "
        "extract(epoch FROM received_at)::float8 AS rx FROM v_records ORDER BY 1, 2, 3, 4"
    )
    assert len(rows) == outcome.acknowledged
    last: dict[tuple[str, str, int], int] = {}
    for r in rows:
        key = (r["edge_id"], r["stream"], r["epoch"])
        n = int(r["uid"].split(":")[1])
        assert n > last.get(key, -1), f"seq order differs from publish order at {r}"
        last[key] = n
        assert started - 1 <= r["rx"] <= finished + 1, r  # the cloud's clock
        sent = r["ev"] - skew[r["edge_id"]]
        assert started - 1 <= sent <= finished + 1, r  # the edge's clock, kept as sent
