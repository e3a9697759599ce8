"""Consumers of the feed survive crashes: a SIGKILLed consumer process resumes from
its checkpoint, and the exactly-once helper applies each record once (issue 13)."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
import time

import asyncpg

from broker.feed import SyncSubscription
from broker.pg_connecting import connected
from broker.protocol.topology import Topology
from cloud_ingest.feeding import record_commit
from cloud_ingest.ingesting import init_connection
from cloud_ingest.ranges import merge_ranges
from cloud_ingest.schema import migrate
from cloud_ingest.writing import GroupWriter
from tests.helpers import until
from tests.integration.test_feed import EPOCH, _batch

CONSUMER = textwrap.dedent("""
    import asyncio, sys
    import asyncpg
    from broker.feed import Subscription

    async def main(dsn: str) -> None:
        conn = await asyncpg.connect(dsn)
        async with Subscription(dsn, "totals", batch_size=7, lease_ttl_s=1.0,
                                stop_when_caught_up=True) as sub:
            async for batch in sub:
                async with sub.exactly_once(conn):
                    await conn.executemany(
                        "INSERT INTO consumed (edge, seq, cursor) VALUES ($1, $2, $3)",
                        [(r.edge, r.seq, r.cursor) for r in batch])
                    await asyncio.sleep(0.05)  # work in progress when the kill lands
        await conn.close()

    asyncio.run(main(sys.argv[1]))
""")

_NOW_US = time.time_ns() // 1000
"""``received_at`` of the rows these tests write (today: its partition exists)."""


async def _write_groups(dsn: str, groups: int, size: int) -> int:
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    gw = GroupWriter(Topology())
    try:
        for g in range(groups):
            first = g * size + 1
            async with conn.transaction():
                span = ("e", "s", EPOCH, first, first + size - 1)
                await gw._insert(conn, GroupWriter.rows(_batch("e", "s", first, size), _NOW_US))
                await record_commit(conn, [span], await merge_ranges(conn, "ranges", [span]))
    finally:
        await conn.close()
    return groups * size


async def _consume(dsn: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, "-c", CONSUMER, dsn)


async def test_a_sigkilled_consumer_resumes_from_its_checkpoint_exactly_once(
    pg_dsn: str
) -> None:
    """A consumer process writing into the same database through ``exactly_once`` is
    SIGKILLed mid-batch; the next process of the same name takes over once the lease
    lapses and finishes: every record is in the consumer's table exactly once."""
    async with connected(pg_dsn) as conn:
        await migrate(conn)
        await conn.execute("CREATE TABLE consumed (edge text, seq bigint, cursor text)")
        total = await _write_groups(pg_dsn, 20, 10)
        first = await _consume(pg_dsn)
        try:
            await until(lambda: _count(conn, 40), timeout=30,
                        message="the consumer never got going")
        finally:
            first.send_signal(signal.SIGKILL)
            await first.wait()
        killed_at = await conn.fetchval("SELECT count(*) FROM consumed")
        assert killed_at < total
        second = await _consume(pg_dsn)
        assert await asyncio.wait_for(second.wait(), 60) == 0
        seqs = [r[0] for r in await conn.fetch("SELECT seq FROM consumed ORDER BY seq")]
        holder = await conn.fetchval(
            "SELECT holder FROM feed_subscriptions WHERE name = 'totals'")
    assert seqs == list(range(1, total + 1))
    assert holder is None  # the clean exit released the lease


async def _count(conn: asyncpg.Connection, n: int) -> bool:
    return int(await conn.fetchval("SELECT count(*) FROM consumed")) >= n


async def test_the_blocking_subscription_reads_and_commits(pg_dsn: str) -> None:
    """SyncSubscription, from synchronous code (here in a worker thread): batches,
    commit, and a reopened subscription continuing after the checkpoint."""
    async with connected(pg_dsn) as conn:
        await migrate(conn)
    await _write_groups(pg_dsn, 3, 5)

    def consume(commit_after: int) -> list[int]:
        seqs: list[int] = []
        with SyncSubscription(pg_dsn, "sync", batch_size=5,
                              stop_when_caught_up=True) as sub:
            for batch in sub:
                seqs += [r.seq for r in batch]
                if len(seqs) <= commit_after:
                    sub.commit()
        return seqs

    assert await asyncio.to_thread(consume, 5) == list(range(1, 16))
    assert await asyncio.to_thread(consume, 0) == list(range(6, 16))
