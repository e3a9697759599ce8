"""The group writer with many keys per group (issue 12's fleet): each key's
``committed_ranges`` row is read only within the seqs the group covers, inserted only
when the group's first read did not find it, and locked before the group commits;
redeliveries and overlapping retransmits among a thousand keys are stored once."""

from __future__ import annotations

import asyncio
import gc

import asyncpg
import pytest
from nats.aio.msg import Msg

from broker.pg_connecting import connected
from broker.protocol.topology import Topology
from cloud_ingest.accounting import accounted_seqs
from cloud_ingest.ingesting import init_connection
from cloud_ingest.packing import int8_array, text_array
from cloud_ingest.writing import GroupWriter
from tests.support import until, waiting_on_a_lock
from tests.support.batches import json_batch_msg

EPOCH = 7


@pytest.fixture
async def conn(migrated_conn: asyncpg.Connection) -> asyncpg.Connection:
    """The migrated database, with the ingest's type codecs on the connection."""
    await init_connection(migrated_conn)
    return migrated_conn


def _msg(edge: str, stream: str, first: int, n: int) -> Msg:
    return json_batch_msg(edge, stream, EPOCH, first, n)


async def test_a_fleet_group_with_redeliveries_and_overlaps_stores_every_record_once(
    conn: asyncpg.Connection,
) -> None:
    gw = GroupWriter(Topology())
    edges = [f"edge-{i:04d}" for i in range(500)]
    # First group: seqs 1-10 of every (edge, stream): 1,000 keys, all new.
    first = await gw.write(conn, [gw.decode(_msg(e, s, 1, 10))
                                  for e in edges for s in ("a", "b")])
    assert first.inserted == 10_000
    # Second group: seqs 11-20 of every key (the keys exist now), plus for some keys a
    # redelivery of 1-10, a retransmit overlapping 15-25 and a batch past a gap (31-35).
    group = [_msg(e, s, 11, 10) for e in edges for s in ("a", "b")]
    group += [_msg(e, "a", 1, 10) for e in edges[:50]]
    group += [_msg(e, "b", 15, 11) for e in edges[50:100]]
    group += [_msg(e, "a", 31, 5) for e in edges[100:150]]
    second = await gw.write(conn, [gw.decode(m) for m in group])
    assert second.inserted == 10_000 + 50 * 5 + 50 * 5
    expected = 20_000 + 250 + 250
    assert await conn.fetchval("SELECT count(*) FROM records") == expected
    assert await conn.fetchval(
        "SELECT count(*) FROM (SELECT DISTINCT edge_id, stream, epoch, seq FROM v_records) d"
    ) == expected
    wm = {(w[0], w[1]): w[3] for w in second.watermarks}
    assert wm[(edges[0], "a")] == 20
    assert wm[(edges[60], "b")] == 25
    assert wm[(edges[120], "a")] == 20  # 31-35 committed, 21-30 not yet
    assert await conn.fetchval("SELECT sum(rows) FROM feed_commits") == expected


async def test_a_key_row_gone_since_the_first_read_is_created_again_and_locked(
    conn: asyncpg.Connection, pg_dsn: str,
) -> None:
    """Only keys the first read did not find are inserted before the lock; a row that
    vanished after that read (an operator's restore) is found missing by the lock and
    created again, so every key of the group is still locked."""
    gw = GroupWriter(Topology())
    await gw.write(conn, [gw.decode(_msg("e1", "s", 1, 5)), gw.decode(_msg("e2", "s", 1, 5))])
    keys = [("e1", "s", EPOCH), ("e2", "s", EPOCH)]
    windows = dict.fromkeys(keys, (6, 11))
    async with connected(pg_dsn) as other, conn.transaction():
        found = await accounted_seqs(conn, keys, windows, lock=False)
        assert set(found) == set(keys)
        await other.execute("DELETE FROM committed_ranges WHERE edge_id = 'e2'")
        locked = await accounted_seqs(conn, keys, windows, lock=True,
                                       existing=frozenset(found))
        assert locked == {keys[0]: [], keys[1]: []}
        # Both keys are held by this transaction: e1's row is locked, and e2's row,
        # created again and not yet committed, makes another writer's insert wait.
        with pytest.raises(asyncpg.LockNotAvailableError):
            await other.fetchval(
                "SELECT 1 FROM committed_ranges WHERE edge_id = 'e1' FOR UPDATE NOWAIT")
        await other.execute("SET lock_timeout = '200ms'")
        with pytest.raises(asyncpg.LockNotAvailableError):
            await other.execute(
                "INSERT INTO committed_ranges (edge_id, stream, epoch, ranges) "
                "VALUES ('e2', 's', $1, '{}') ON CONFLICT DO NOTHING", EPOCH)


async def test_the_reads_return_only_what_is_accounted_within_the_window(
    conn: asyncpg.Connection,
) -> None:
    gw = GroupWriter(Topology())
    await gw.write(conn, [gw.decode(_msg("e", "s", 1, 10)), gw.decode(_msg("e", "s", 21, 10))])
    key = ("e", "s", EPOCH)
    assert await accounted_seqs(conn, [key], {key: (11, 21)}, lock=False) == {key: []}
    assert await accounted_seqs(conn, [key], {key: (5, 25)}, lock=False) == {
        key: [(5, 11), (21, 25)]}


async def test_a_written_group_leaves_no_cycle_holding_its_rows(
    conn: asyncpg.Connection,
) -> None:
    """The rows a group built are freed when write returns, by reference counting: no
    reference cycle keeps them (and their payloads) for the cyclic GC to find later.
    (The bisecting COPY was a closure calling itself: a cycle holding the rows.)"""
    gw = GroupWriter(Topology())
    group = [gw.decode(_msg(f"edge-{i}", "a", 1, 100)) for i in range(20)]
    gc.collect()
    gc.disable()
    try:
        result = await gw.write(conn, group)
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert result.inserted == 2_000
    assert unreachable < 200, f"{unreachable} objects were left in reference cycles"


@pytest.mark.parametrize("values", [
    [], [""], ["", "a"], ["a", ""], ["edge-1", "edge_2"], ["a\x1fb", "c"], ["x,y", "{z}", '"q"'],
])
async def test_packed_text_arrays_reach_postgresql_exactly(
    conn: asyncpg.Connection, values: list[str],
) -> None:
    """A text array packed into one parameter (cloud_ingest.packing) arrives as the same
    array, whatever the strings hold: those it cannot pack go as a list."""
    sql, value = text_array(values, 1)
    assert await conn.fetchval(f"SELECT {sql}", value) == values
    packable = values != [""] and not any("\x1f" in v for v in values)
    assert isinstance(value, str) == packable


async def test_packed_int8_arrays_reach_postgresql_exactly(conn: asyncpg.Connection) -> None:
    for values in ([], [0], [1, -2, 2**63 - 1, -(2**63)]):
        sql, value = int8_array(values, 1)
        assert await conn.fetchval(f"SELECT {sql}", value) == values


async def test_stream_keys_adds_new_keys_at_once_and_keeps_known_ids(
    conn: asyncpg.Connection,
) -> None:
    gw = GroupWriter(Topology())
    first = await gw.stream_keys(conn, [("a", "s", 1), ("b", "s", 1)])
    keys = [("a", "s", 1), ("b", "s", 1), ("c", "s", 1), ("c", "s", 2)]
    fresh = GroupWriter(Topology())  # no cache: every key is asked of PostgreSQL
    ids = await fresh.stream_keys(conn, keys)
    assert {k: ids[k] for k in first} == first
    stored = {(r[0], r[1], r[2]): r[3] for r in await conn.fetch(
        "SELECT edge_id, stream, epoch, id FROM stream_keys")}
    assert stored == {k: ids[k] for k in keys}
    assert len(set(stored.values())) == 4


async def test_a_stream_key_added_by_a_concurrent_transaction_is_found_too(
    conn: asyncpg.Connection, pg_dsn: str,
) -> None:
    """The key is inserted by another open transaction: the set-based insert waits on
    it, then skips it (not in its snapshot either), and the per-key lookup finds it."""
    gw = GroupWriter(Topology())
    async with connected(pg_dsn) as other, connected(pg_dsn) as observer:
        tx = other.transaction()
        await tx.start()
        committed = False
        try:
            theirs = await other.fetchval(
                "INSERT INTO stream_keys (edge_id, stream, epoch) VALUES ('x', 's', 1) "
                "RETURNING id")
            lookup = asyncio.create_task(gw.stream_keys(conn, [("x", "s", 1), ("y", "s", 1)]))
            pid = conn.get_server_pid()
            await until(lambda: waiting_on_a_lock(observer, pid), timeout=10,
                        message="the lookup never waited on the insert")
            await tx.commit()
            committed = True
            ids = await asyncio.wait_for(lookup, timeout=10)
        finally:
            if not committed:
                await tx.rollback()
    assert ids[("x", "s", 1)] == theirs
    assert await conn.fetchval("SELECT count(*) FROM stream_keys") == 2
