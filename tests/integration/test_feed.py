"""The commit-ordered feed: every committed row once, in commit order, never an
uncommitted one, whatever order concurrent writers commit in (issue 13)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.feed import Filters, Subscription, read_page
from broker.feed.positions import EARLIEST
from broker.pg_connecting import connected
from broker.protocol.topology import Topology
from broker.protocol.wire import CT_JSON, Batch, Record, encode_batch
from broker.runtime.embedded_nats import EmbeddedNats
from cloud_ingest.feeding import record_commit
from cloud_ingest.ingesting import init_connection
from cloud_ingest.ranges import merge_ranges
from cloud_ingest.schema import migrate
from cloud_ingest.writing import GroupWriter
from tests.helpers import until
from tests.integration.harness import running_ingest, wait_for_records

EPOCH = 7

_NOW_US = time.time_ns() // 1000
"""``received_at`` of the rows these tests write (today: its partition exists)."""


def _records(first: int, n: int) -> list[Record]:
    return [Record(1_700_000_000_000_000 + s, CT_JSON, b'{"n": %d}' % s)
            for s in range(first, first + n)]


def _batch(edge: str, stream: str, first: int, n: int) -> Batch:
    return Batch(1, edge, stream, EPOCH, first, _records(first, n))


@pytest.fixture
async def migrated(pg_dsn: str) -> AsyncIterator[str]:
    async with connected(pg_dsn) as conn:
        await migrate(conn)
    yield pg_dsn


async def _read_all(conn: asyncpg.Connection, after: int = EARLIEST,
                    filters: Filters | None = None, limit: int = 7
                    ) -> tuple[list[tuple[int, tuple[str, str, int, int]]], int]:
    """Every record after ``after``, page by page (small pages: splits commits)."""
    got: list[tuple[int, tuple[str, str, int, int]]] = []
    while True:
        page = await read_page(conn, after, filters or Filters(), limit=limit)
        assert page.cursor >= after
        got += [(r.position, r.identity) for r in page.records]
        after = page.cursor
        if page.caught_up:
            return got, after


async def test_the_ingest_feeds_every_row_once_even_with_overlapping_redeliveries(
    nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """Batches that overlap rows already committed (a producer's retransmit with a
    new boundary) go through the duplicate fallback: the feed lists only the rows each
    commit inserted, so every record appears once, in increasing positions."""
    async with running_ingest(pg_dsn, nats_server.url):
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        try:
            for first, n in ((1, 50), (41, 30), (1, 100), (101, 20)):
                body, _ = encode_batch(_batch("e1", "s", first, n))
                await js.publish(Topology().records_subject("e1", "s"), body)
            body, _ = encode_batch(_batch("e2", "t", 1, 10))
            await js.publish(Topology().records_subject("e2", "t"), body)
        finally:
            await nc.close()
        await wait_for_records(pg_dsn, 130)
        async with connected(pg_dsn) as conn:
            got, _ = await _read_all(conn)
            only_t, _ = await _read_all(conn, filters=Filters.of(streams=["t"]))
            view = [(r[0], (r[1], r[2], r[3], r[4])) for r in await conn.fetch(
                "SELECT position, edge_id, stream, epoch, seq FROM v_feed ORDER BY position")]
    positions = [p for p, _ in got]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    ids = [i for _, i in got]
    assert sorted(ids) == sorted({*[("e1", "s", EPOCH, s) for s in range(1, 121)],
                                  *[("e2", "t", EPOCH, s) for s in range(1, 11)]})
    assert [i for _, i in only_t] == [("e2", "t", EPOCH, s) for s in range(1, 11)]
    assert view == got  # the SQL view is the same feed


# -- the race, property-tested ---------------------------------------------------------

_Step = tuple[str, int]


@st.composite
def _schedules(draw: st.DrawFn) -> list[_Step]:
    """Random interleavings of two writers' transactions and a reader.

    Each writer repeatedly begins a group, inserts it, records its feed entry and
    commits (or rolls back); ``both`` commits the two open groups at the same moment,
    so their COMMITs race; ``read`` reads the feed at that point."""
    steps: list[_Step] = []
    for _ in range(draw(st.integers(4, 24))):
        steps.append(draw(st.sampled_from(
            [("go", 0), ("go", 1), ("go", 0), ("go", 1), ("read", 0), ("both", 0),
             ("abort", 0), ("abort", 1)])))
    return steps


class _Writer:
    """One ingest worker's transaction, stepped: begin+insert, then commit."""

    def __init__(self, conn: asyncpg.Connection, edge: str) -> None:
        self.conn = conn
        self.edge = edge
        self.next_seq = 1
        self.tx: asyncpg.transaction.Transaction | None = None
        self.pending: list[tuple[str, str, int, int]] = []
        self.committed: list[tuple[str, str, int, int]] = []

    async def begin(self, writer: GroupWriter, n: int) -> None:
        self.tx = self.conn.transaction()
        await self.tx.start()
        first, self.next_seq = self.next_seq, self.next_seq + n
        await writer._insert(self.conn, GroupWriter.rows(_batch(self.edge, "s", first, n), _NOW_US))
        span = (self.edge, "s", EPOCH, first, first + n - 1)
        marks = await merge_ranges(self.conn, "ranges", [span])
        await record_commit(self.conn, [span], marks)
        self.pending = [(self.edge, "s", EPOCH, s) for s in range(first, first + n)]

    async def end(self, commit: bool) -> None:
        assert self.tx is not None
        if commit:
            await self.tx.commit()
            self.committed += self.pending
        else:
            await self.tx.rollback()
            self.next_seq -= len(self.pending)
        self.tx, self.pending = None, []


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schedule=_schedules(), sizes=st.lists(st.integers(1, 9), min_size=24, max_size=24))
async def test_no_row_is_skipped_or_duplicated_whatever_the_commit_interleaving(
    migrated: str, schedule: list[_Step], sizes: list[int]
) -> None:
    """Two writers commit in any interleaving (one starting first and committing last,
    both committing at once, rollbacks) while a reader follows the feed from its
    cursor: the reader gets exactly the committed rows, each once, in increasing
    position, and never a row of an open or rolled-back transaction."""
    conns = [await asyncpg.connect(migrated) for _ in range(3)]
    for c in conns[:2]:
        await init_connection(c)
    try:
        await conns[2].execute("TRUNCATE records, committed_ranges, feed_commits")
        gw = GroupWriter(Topology())
        writers = [_Writer(conns[0], "a"), _Writer(conns[1], "b")]
        seen: list[tuple[int, tuple[str, str, int, int]]] = []
        cursor = EARLIEST

        async def read() -> None:
            nonlocal cursor
            got, cursor = await _read_all(conns[2], cursor, limit=4)
            seen.extend(got)
            visible = {i for w in writers for i in w.committed}
            assert {i for _, i in seen} <= visible, "a row of an open transaction was read"

        for i, (op, who) in enumerate(schedule):
            w = writers[who]
            if op == "go":
                if w.tx is None:
                    await w.begin(gw, sizes[i])
                else:
                    await w.end(commit=True)
            elif op == "abort" and w.tx is not None:
                await w.end(commit=False)
            elif op == "both":
                await asyncio.gather(*(x.end(commit=True) for x in writers if x.tx))
            elif op == "read":
                await read()
        for w in writers:
            if w.tx is not None:
                await w.end(commit=True)
        await read()
    finally:
        for c in conns:
            await c.close()
    positions = [p for p, _ in seen]
    assert positions == sorted(positions), "the feed went back"
    assert len(positions) == len(set(positions))
    ids = [i for _, i in seen]
    assert len(ids) == len(set(ids)), "a row was delivered twice"
    assert set(ids) == {i for w in writers for i in w.committed}, "a row was skipped"


async def test_a_reader_racing_many_concurrent_commits_skips_nothing(migrated: str) -> None:
    """Four writers commit small groups as fast as they can while a reader follows
    the feed: every committed row reaches the reader once, in increasing position.
    (Without commit-time ids, a reader regularly skips a group that committed after
    a later-numbered one.)"""
    writers = [await asyncpg.connect(migrated) for _ in range(4)]
    reader = await asyncpg.connect(migrated)
    gw = GroupWriter(Topology())
    done = asyncio.Event()

    async def write(k: int, conn: asyncpg.Connection) -> int:
        await init_connection(conn)
        seq = 1
        while not done.is_set():
            async with conn.transaction():
                span = (f"w{k}", "s", EPOCH, seq, seq + 2)
                await gw._insert(conn, GroupWriter.rows(_batch(f"w{k}", "s", seq, 3), _NOW_US))
                await record_commit(conn, [span],
                                    await merge_ranges(conn, "ranges", [span]))
            seq += 3
        return seq - 1

    tasks = [asyncio.create_task(write(k, c)) for k, c in enumerate(writers)]
    seen: list[tuple[int, tuple[str, str, int, int]]] = []
    cursor = EARLIEST
    try:
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + 3.0
        while loop.time() < stop_at:
            page = await read_page(reader, cursor, limit=50)
            seen += [(r.position, r.identity) for r in page.records]
            cursor = page.cursor
        done.set()
        totals = await asyncio.gather(*tasks)
        got, cursor = await _read_all(reader, cursor, limit=500)
        seen += got
    finally:
        done.set()
        for c in [*writers, reader]:
            await c.close()
    positions = [p for p, _ in seen]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert sorted(i for _, i in seen) == sorted(
        (f"w{k}", "s", EPOCH, s) for k, n in enumerate(totals) for s in range(1, n + 1))


async def test_a_subscription_resumes_from_its_checkpoint_and_knows_completeness(
    migrated: str
) -> None:
    """A named subscription commits after its first batch, is closed and reopened
    (another process, same name): it resumes after the checkpoint, and knows up to
    which seq each stream is complete at its cursor."""
    conn = await asyncpg.connect(migrated)
    await init_connection(conn)
    gw = GroupWriter(Topology())

    async def commit_group(first: int, n: int) -> None:
        async with conn.transaction():
            span = ("e", "s", EPOCH, first, first + n - 1)
            await gw._insert(conn, GroupWriter.rows(_batch("e", "s", first, n), _NOW_US))
            await record_commit(conn, [span], await merge_ranges(conn, "ranges", [span]))

    try:
        await commit_group(1, 10)
        await commit_group(11, 10)
        async with Subscription(migrated, "sub", batch_size=10) as sub:
            first = await anext(aiter(sub))
            await sub.commit()
            assert [r.seq for r in first] == list(range(1, 11))
            assert sub.completeness() == {("e", "s", EPOCH): 10}
            second = await anext(aiter(sub))  # read, not committed: delivered again
            assert [r.seq for r in second] == list(range(11, 21))
        async with Subscription(migrated, "sub", batch_size=100,
                                stop_when_caught_up=True) as again:
            assert again.completeness() == {("e", "s", EPOCH): 10}
            seqs = [r.seq async for batch in again for r in batch]
            assert again.completeness() == {("e", "s", EPOCH): 20}
            await again.commit()
        assert seqs == list(range(11, 21))
        async with Subscription(migrated, "late", start_at="latest",
                                stop_when_caught_up=True) as late:
            assert [b async for b in late] == []
            assert late.completeness() == {("e", "s", EPOCH): 20}
        async with Subscription(migrated, "timed", start_at=datetime.now(UTC),
                                stop_when_caught_up=True) as timed:
            await commit_group(21, 5)
            assert [r.seq async for b in timed for r in b] == list(range(21, 26))
    finally:
        await conn.close()


async def test_a_waiting_subscription_is_woken_by_the_commit(migrated: str) -> None:
    """A caught-up subscription waits on LISTEN, not on its poll interval: a commit
    reaches it well within the (here, one minute) poll."""
    conn = await asyncpg.connect(migrated)
    await init_connection(conn)
    try:
        async with Subscription(migrated, "live", start_at="latest", poll_s=60) as sub:
            nxt = asyncio.create_task(anext(aiter(sub)))
            await until(lambda: sub.waiting, timeout=5, message="never caught up")
            assert not nxt.done()
            async with conn.transaction():
                span = ("e", "s", EPOCH, 1, 3)
                await GroupWriter(Topology())._insert(
                    conn, GroupWriter.rows(_batch("e", "s", 1, 3), _NOW_US))
                await record_commit(conn, [span], await merge_ranges(conn, "ranges", [span]))
            batch = await asyncio.wait_for(nxt, 5)
        assert [r.seq for r in batch] == [1, 2, 3]
        assert batch.records[0].payload == {"n": 1}
    finally:
        await conn.close()


async def test_one_process_holds_a_subscription_and_a_stale_holder_cannot_commit(
    migrated: str
) -> None:
    """A second process of the same name waits as a standby; once the first one's lease
    lapses the standby takes over, and the stalled first one's checkpoint is refused."""
    first = Subscription(migrated, "shared", lease_ttl_s=0.5)
    await first.open()
    try:
        busy = Subscription(migrated, "shared", wait_for_lease=False)
        with pytest.raises(Exception, match="held by another process"):
            await busy.open()
        second = Subscription(migrated, "shared", lease_ttl_s=30)
        await asyncio.wait_for(second.open(), 10)  # waits for the lapse
        try:
            with pytest.raises(Exception, match="lease passed"):
                await first.commit()
        finally:
            await second.close()
    finally:
        await first.close()
    await until(lambda: True)
