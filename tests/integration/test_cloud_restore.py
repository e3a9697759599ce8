"""The cloud loses committed rows (a restore from an older backup): nothing stalls.

The edge reports its trim floor; the cloud records what it no longer holds below
it as *lost after commit*, the watermark moves again, the edge trims again, and
every acknowledged record is either a row or counted as lost after commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import asyncpg

from broker.runtime.embedded_nats import EmbeddedNats
from broker.settings import ShipperSettings
from cloud_ingest.service import Ingest
from edge_bridge.bridge import Bridge
from edge_bridge.sdk import EdgeClient, RecordAck
from tests.integration.harness import (
    bridge_settings,
    buffered_is,
    running_bridge,
    running_ingest,
)
from tests.support import retrying_deadlocks, until

KEY = ("edge-1", "s")


async def produce(url: str, acked: list[RecordAck], stop: asyncio.Event,
                  per_round: int = 50) -> None:
    """Publish rounds of records until ``stop``; every acknowledgement lands in ``acked``."""
    async with EdgeClient(url, linger_ms=2) as client:
        i = 0
        while not stop.is_set():
            futures = [client.publish("s", {"i": i + k}) for k in range(per_round)]
            i += per_round
            await client.flush()
            acked.extend(f.result() for f in futures)
            await asyncio.sleep(0.02)


async def backup(conn: asyncpg.Connection) -> None:
    """Copy the key's rows aside, as a backup taken now would hold them (one snapshot,
    like pg_dump's, so rows and ranges agree)."""
    await conn.execute("DROP TABLE IF EXISTS backup_records, backup_ranges")
    async with conn.transaction(isolation="repeatable_read"):
        await conn.execute("CREATE TABLE backup_records AS SELECT r.* FROM records r "
                           "JOIN stream_keys k ON k.id = r.stream_key "
                           "WHERE (k.edge_id, k.stream) = ($1, $2)", *KEY)
        await conn.execute("CREATE TABLE backup_ranges AS SELECT * FROM committed_ranges "
                           "WHERE (edge_id, stream) = ($1, $2)", *KEY)


async def restore(conn: asyncpg.Connection) -> None:
    """Put the key's rows back as the backup had them: what was committed since is gone.

    The locks are taken while the ingest commits, which locks ``records`` before
    ``committed_ranges``: PostgreSQL may then end the restore as a deadlock's victim,
    and it is tried again, as an operator would."""
    await retrying_deadlocks(lambda: _restore_once(conn))


async def _restore_once(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        # Like a restore, all at once: no ingest commit lands half before, half after.
        await conn.execute("LOCK TABLE committed_ranges, records IN ACCESS EXCLUSIVE MODE")
        await conn.execute("DELETE FROM records WHERE stream_key IN (SELECT id FROM "
                           "stream_keys WHERE (edge_id, stream) = ($1, $2))", *KEY)
        await conn.execute("DELETE FROM committed_ranges WHERE (edge_id, stream) = ($1, $2)",
                           *KEY)
        await conn.execute("INSERT INTO records SELECT * FROM backup_records")
        await conn.execute("INSERT INTO committed_ranges SELECT * FROM backup_ranges")


async def completeness(conn: asyncpg.Connection) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM v_completeness WHERE (edge_id, stream) = ($1, $2)", *KEY)


def lost_metric(ingest: Ingest) -> float:
    return ingest.metrics.registry.get_sample_value(
        "edgesync_records_lost_after_commit_total") or 0.0


async def test_a_restored_database_counts_lost_after_commit_and_nothing_stalls(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """Under load, the key's rows are put back to an earlier backup. Afterwards the
    stream has 0 missing, its watermark reaches the last seq, the edge's buffer drains
    to 0, and every acknowledged record is a row or inside lost_after_commit (whose
    count the metric and `status --gaps` show)."""
    settings = bridge_settings(
        tmp_path, shipper=ShipperSettings(linger_ms=2, retransmit_timeout_s=1.0,
                                          retransmit_backoff_max_s=2.0))
    acked: list[RecordAck] = []
    stop = asyncio.Event()
    conn = await asyncpg.connect(pg_dsn)
    try:
        async with (running_ingest(pg_dsn, nats_server.url) as ingest,
                    running_bridge(settings, nats_server.url) as bridge):
            producer = asyncio.create_task(produce(bridge.url, acked, stop))
            try:
                await until(lambda: len(acked) >= 1_000, timeout=30)
                await until(lambda: trimmed(bridge) >= 500, timeout=30,
                            message="the edge never trimmed")
                await backup(conn)
                floor_at_backup = trimmed(bridge)
                await until(lambda: trimmed(bridge) >= floor_at_backup + 1_000, timeout=30,
                            message="the edge stopped trimming before the restore")
                await restore(conn)
                restored_floor = trimmed(bridge)
                await until(lambda: len(acked) >= restored_floor + 1_000, timeout=30)
            finally:
                stop.set()
                await producer
            last = acked[-1].seq

            async def settled() -> asyncpg.Record | None:
                row = await completeness(conn)
                ok = row is not None and row["watermark"] == last and row["missing_records"] == 0
                return row if ok else None

            await until(settled, timeout=60, interval=0.2,
                        message="the stream stalled after the restore")
            await until(lambda: buffered_is(bridge, 0), timeout=30,
                        message="the edge buffer never drained")
            counted = lost_metric(ingest)
        # Read once everything has stopped: a retransmitted copy still in JetStream may
        # commit a seq counted lost a moment before; it is then a row, not lost.
        row = await completeness(conn)
        assert row is not None and row["missing_records"] == 0
        assert row["lost_after_commit_records"] > 0
        recorded = await conn.fetchval(
            "SELECT es_count(lost_after_commit) FROM committed_ranges "
            "WHERE (edge_id, stream) = ($1, $2)", *KEY)
        assert counted == recorded  # the metric counts what was recorded, once
        held = {r["seq"] for r in await conn.fetch(
            "SELECT seq FROM v_records WHERE (edge_id, stream) = ($1, $2)", *KEY)}
        lost = [(r.lower, r.upper) for r in row["lost_after_commit_ranges"]]
    finally:
        with contextlib.suppress(Exception):
            await conn.execute("DROP TABLE IF EXISTS backup_records, backup_ranges")
        await conn.close()
    assert len({a.seq for a in acked}) == len(acked) == last
    for ack in acked:
        assert (ack.seq in held) != any(lo <= ack.seq < hi for lo, hi in lost), ack.seq
    assert len(held) + row["lost_after_commit_records"] == last
    shown = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "broker", "status", "--gaps", "--dsn", pg_dsn],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "250"},
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert "lost after commit" in shown.stdout
    assert f"{row['lost_after_commit_records']:,} [" in shown.stdout


def trimmed(bridge: Bridge) -> int:
    state = bridge.buffer.stream_state("s")
    return 0 if state is None else state.committed_seq


