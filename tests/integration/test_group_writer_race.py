"""Two writers racing for the same seqs (a redelivery while the first delivery's
transaction is still open): the one that commits second finds the other's commit when
it takes the key's lock, undoes its COPY and writes nothing twice
(cloud_ingest.writing, step 2). The interleaving is made by PostgreSQL's own row lock,
not by timing: the second writer is seen waiting on it before the first commits."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import structlog

from broker.pg_connecting import connected
from broker.protocol.topology import Topology
from cloud_ingest.ingesting import init_connection
from cloud_ingest.writing import GroupWriter
from tests.support import until, waiting_on_a_lock
from tests.support.batches import json_batch_msg

EPOCH = 11


@pytest.fixture
async def conn(migrated_conn: asyncpg.Connection) -> asyncpg.Connection:
    await init_connection(migrated_conn)
    return migrated_conn


@pytest.mark.parametrize("first_seen", [True, False], ids=["key-known", "key-new"])
async def test_a_redelivery_racing_an_open_commit_is_undone_and_stored_once(
    conn: asyncpg.Connection, pg_dsn: str, first_seen: bool,
) -> None:
    writer_a, writer_b = GroupWriter(Topology()), GroupWriter(Topology())
    if first_seen:  # the key's committed_ranges row exists before the race
        await writer_a.write(conn, [writer_a.decode(json_batch_msg("e1", "s", EPOCH, 1, 5))])
    else:  # only its stream_keys id: the committed_ranges row is the racers' to create
        await writer_a.stream_keys(conn, [("e1", "s", EPOCH)])
    racing = json_batch_msg("e1", "s", EPOCH, 6, 10)
    async with connected(pg_dsn) as other, connected(pg_dsn) as observer:
        await init_connection(other)
        b = other.transaction()
        await b.start()
        committed = False
        try:
            first = await writer_b.write(other, [writer_b.decode(racing)])
            assert first.inserted == 10
            with structlog.testing.capture_logs() as logs:
                second = asyncio.create_task(writer_a.write(conn, [writer_a.decode(racing)]))
                pid = conn.get_server_pid()
                await until(lambda: waiting_on_a_lock(observer, pid), timeout=10,
                            message="the second writer never waited on the first's lock")
                assert not second.done()
                await b.commit()
                committed = True
                result = await asyncio.wait_for(second, timeout=10)
        finally:
            if not committed:
                await b.rollback()
    assert result.inserted == 0
    # The race was seen after the COPY (the first read found nothing of 6-15), then
    # the COPY undone and the group redone under the lock.
    assert [e["event"] for e in logs].count("group_raced_redelivery") == 1
    rows = await conn.fetch(
        "SELECT seq, count(*) AS n FROM v_records WHERE edge_id = 'e1' GROUP BY seq "
        "ORDER BY seq")
    assert [(r["seq"], r["n"]) for r in rows] == [
        (s, 1) for s in range(1 if first_seen else 6, 16)]
    assert await conn.fetchval(  # seqs 1-5 were never sent in the second case
        "SELECT watermark FROM v_completeness WHERE edge_id = 'e1' AND stream = 's'"
    ) == (15 if first_seen else 0)
