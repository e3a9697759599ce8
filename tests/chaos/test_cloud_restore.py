"""PostgreSQL restored from an older backup under load: no stream stalls.

A backup of ``records`` and ``committed_ranges`` (one consistent snapshot, as
pg_dump takes it) is taken mid-run and put back a while later, with both
ingests and both bridges running and producers publishing. The edges trimmed
much of what was committed since; the cloud must count that as *lost after
commit* (from the edges' trim floors), move every watermark on, take the
retransmitted rest, and let the edges' buffers drain.
"""

from __future__ import annotations

import time

from broker.pg_connecting import connected
from tests.chaos.harness import ChaosSystem, Identity, Load, Outcome, duplicated_rows
from tests.support import retrying_deadlocks, until


async def backup(dsn: str) -> None:
    async with connected(dsn) as conn:
        await conn.execute("DROP TABLE IF EXISTS backup_records, backup_ranges")
        async with conn.transaction(isolation="repeatable_read"):
            await conn.execute("CREATE TABLE backup_records AS SELECT * FROM records")
            await conn.execute("CREATE TABLE backup_ranges AS SELECT * FROM committed_ranges")


async def restore(dsn: str) -> None:
    """The backup put back at once. The ingest, committing meanwhile, locks ``records``
    before ``committed_ranges``: a deadlock's victim is tried again."""
    async with connected(dsn) as conn:

        async def once() -> None:
            async with conn.transaction():
                await conn.execute(
                    "LOCK TABLE committed_ranges, records IN ACCESS EXCLUSIVE MODE")
                await conn.execute("TRUNCATE records, committed_ranges")
                await conn.execute("INSERT INTO records SELECT * FROM backup_records")
                await conn.execute("INSERT INTO committed_ranges SELECT * FROM backup_ranges")

        await retrying_deadlocks(once)


LostRanges = dict[tuple[str, str, int], list[tuple[int, int]]]
"""``(edge, stream, epoch)`` -> half-open seq ranges counted lost after commit."""


async def lost_after_commit(system: ChaosSystem) -> LostRanges:
    rows = await system._fetch(
        "SELECT edge_id, stream, epoch, lost_after_commit_ranges FROM v_completeness")
    return {(r[0], r[1], r[2]): [(x.lower, x.upper) for x in r[3]] for r in rows}


def counted_lost(ident: Identity, lost: LostRanges) -> bool:
    edge, stream, epoch, seq = ident
    return any(lo <= seq < hi for lo, hi in lost.get((edge, stream, epoch), []))


async def test_postgres_restored_from_an_older_backup_under_load_stalls_nothing(
    system: ChaosSystem,
) -> None:
    """Every acknowledged record ends committed (once) or counted lost after commit;
    0 missing, every watermark at its stream's last acknowledged seq, buffers empty."""
    async with Load(system) as load:
        await load.wait_acked(4_000)
        await backup(system.dsn)
        await load.wait_acked(len(load.acked) + 8_000, timeout=60)
        await restore(system.dsn)
        restored_at = time.monotonic()
        await load.wait_acked(len(load.acked) + 4_000, timeout=60)
    last: dict[tuple[str, str, int], int] = {}
    for edge, stream, epoch, seq in load.acked:
        last[(edge, stream, epoch)] = max(last.get((edge, stream, epoch), 0), seq)

    async def settled() -> bool:
        rows = await system._fetch(
            "SELECT edge_id, stream, epoch, watermark, missing_records FROM v_completeness")
        marks = {(r[0], r[1], r[2]): (r[3], r[4]) for r in rows}
        buffered = await system._fetch("SELECT coalesce(sum(buffer_records), 0) FROM edges")
        caught_up = all(
            marks.get(k, (0, 1))[0] >= v and marks[k][1] == 0 for k, v in last.items())
        return caught_up and buffered[0][0] == 0

    await until(settled, timeout=180, interval=0.5,
                message="a stream stalled, or an edge kept its records, after the restore")
    recover = time.monotonic() - restored_at
    committed = await system.committed_identities()
    lost = await lost_after_commit(system)
    unaccounted = counted = 0
    for ident, uid in load.acked.items():
        if ident in committed:
            assert committed[ident] == [uid], (ident, committed[ident], uid)
            assert not counted_lost(ident, lost), ident  # never both
        elif counted_lost(ident, lost):
            counted += 1
        else:
            unaccounted += 1
    outcome = Outcome(
        scenario="PostgreSQL restored from an older backup under load",
        acknowledged=len(load.acked),
        committed=sum(1 for i in load.acked if i in committed),
        lost=unaccounted,
        duplicated=duplicated_rows(committed),
        dropped_by_policy=0,
        recover_s=round(recover, 1),
        notes=f"{counted} counted lost after commit (edges had trimmed them); "
              "0 missing, watermarks at the last seq, buffers empty",
    )
    outcome.save()
    assert outcome.lost == 0, outcome
    assert outcome.duplicated == 0, outcome
    assert counted > 0, "the restore should have cost rows the edges had already trimmed"
