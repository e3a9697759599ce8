"""Feed pages are bounded by bytes as well as by records (``read_page(max_bytes=...)``,
``Subscription(batch_max_bytes=...)``): a page ends before the record that would take
it past its budget, with its cursor right after its last record and ``caught_up``
false, so that the next read resumes exactly there; a record larger than the budget
comes alone. Whether PostgreSQL sums the rows' sizes (commits that do not say how big
their records are) or the commits vouch for a page, the pages are the same."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

import asyncpg
import msgspec
import pytest

from broker.feed import FeedRecord, Filters, Subscription, read_page
from broker.feed.positions import EARLIEST, ORD_END, ord_of
from broker.pg_connecting import connected
from broker.protocol.topology import Topology
from broker.protocol.wire import CT_JSON, CT_RAW, Batch, Record
from cloud_ingest.feeding import record_commit
from cloud_ingest.ingesting import init_connection
from cloud_ingest.ranges import merge_ranges
from cloud_ingest.schema import migrate
from cloud_ingest.writing import GroupWriter

EPOCH = 5
BUDGET = 16 * 1024
_NOW_US = time.time_ns() // 1000
"""``received_at`` of the rows these tests write (today: its partition exists)."""


def _json(n: int, seq: int) -> Record:
    """A JSON record of about ``n`` bytes (a string), keyed."""
    return Record(1_700_000_000_000_000 + seq, CT_JSON,
                  msgspec.json.encode("x" * n), f"key-{seq}")


def _other(n: int, seq: int) -> Record:
    """An opaque record of ``n`` bytes with headers."""
    return Record(1_700_000_000_000_000 + seq, CT_RAW, bytes(n), None, {"h": "v" * 100})


def size_of(r: Record | FeedRecord) -> int:
    """The bytes the budget counts: payload, headers (their JSON) and key, as stored."""
    if isinstance(r, FeedRecord):
        payload = r.payload if isinstance(r.payload, bytes) else msgspec.json.encode(r.payload)
    else:
        payload = r.payload
    return (len(payload) + (len(msgspec.json.encode(r.headers)) if r.headers else 0)
            + len((r.key or "").encode()))


# Three commits: (edge, stream, records). The second holds a record larger than the
# budget between small ones; the third opaque records with headers.
COMMITS: list[tuple[str, str, list[Record]]] = [
    ("e1", "s", [_json(3000, s) for s in range(1, 11)]),
    ("e1", "s", [_json(1000, 11), _json(40_000, 12), *(_json(1000, s) for s in range(13, 18))]),
    ("e2", "t", [_other(5000, s) for s in range(1, 7)]),
]
IDS = [("e1", "s", EPOCH, s) for s in range(1, 18)] + [("e2", "t", EPOCH, s) for s in range(1, 7)]
SIZES = dict(zip(IDS, (size_of(r) for _, _, rs in COMMITS for r in rs), strict=True))


async def write(conn: asyncpg.Connection, commits: Sequence[tuple[str, str, list[Record]]],
                *, vouch: bool, reverse: bool = False,
                order: Sequence[int] | None = None) -> None:
    """Commit each group as the ingest would (rows, committed ranges, feed entry). With
    ``vouch`` the feed entry says how big the records are (the ingest does); with
    ``reverse`` the rows are written in descending seq order, with ``order`` in that
    order of their indexes."""
    await init_connection(conn)
    gw = GroupWriter(Topology())
    first = {("e1", "s"): 1, ("e2", "t"): 1}
    for edge, stream, records in commits:
        seq = first[(edge, stream)]
        first[(edge, stream)] += len(records)
        rows = GroupWriter.rows(Batch(1, edge, stream, EPOCH, seq, records), _NOW_US)
        span = (edge, stream, EPOCH, seq, seq + len(records) - 1)
        async with conn.transaction():
            if order is not None:
                rows = [rows[i] for i in order]
            await gw._insert(conn, rows[::-1] if reverse else rows)
            await record_commit(conn, [span], await merge_ranges(conn, "ranges", [span]),
                                received_us=_NOW_US,
                                max_record_bytes=max(map(size_of, records)) if vouch else None)


@pytest.fixture
async def migrated(pg_dsn: str) -> AsyncIterator[str]:
    async with connected(pg_dsn) as conn:
        await migrate(conn)
    yield pg_dsn


def check_bounded(records: Sequence[FeedRecord], budget: int = BUDGET) -> None:
    """Within the budget, or one record alone."""
    assert len(records) == 1 or sum(SIZES[r.identity] for r in records) <= budget, (
        [r.identity for r in records])


@pytest.mark.parametrize("vouch", [False, True], ids=["summed", "vouched"])
async def test_pages_stop_at_the_byte_budget_and_resume_exactly(
    migrated: str, vouch: bool
) -> None:
    """Every page is within 16 KiB or one record; a page ends early with caught_up
    false and its cursor after its last record; the 40 KB record comes alone; read page
    by page, every record comes once, in order, whole; completeness arrives with the
    page that finishes a commit, not before."""
    async with connected(migrated) as conn:
        await write(conn, COMMITS, vouch=vouch)
        pages = []
        after = EARLIEST
        while True:
            page = await read_page(conn, after, limit=1000, max_bytes=BUDGET)
            assert page.records and page.cursor > after
            pages.append(page)
            after = page.cursor
            if page.caught_up:
                break
            # ended early: its cursor is just after its last record
            assert page.cursor == page.records[-1].position
    got = [r for p in pages for r in p.records]
    assert [r.identity for r in got] == IDS
    assert [r.position for r in got] == sorted({r.position for r in got})
    assert all(size_of(r) == SIZES[r.identity] for r in got)  # payloads whole
    for page in pages:
        check_bounded(page.records)
    big = next(p for p in pages if ("e1", "s", EPOCH, 12) in [r.identity for r in p.records])
    assert [r.seq for r in big.records] == [12]
    assert len(pages) >= 6  # 30 KB + 47 KB + 31 KB in pages of 16 KB
    # Completeness never runs ahead of the records delivered: it comes with the page
    # that finishes a commit, not with one cut inside it.
    assert pages[0].watermarks == {}  # the first commit is not finished by page one
    seen: set[tuple[str, str, int, int]] = set()
    for page in pages:
        seen |= {r.identity for r in page.records}
        for (edge, stream, epoch), w in page.watermarks.items():
            assert {(edge, stream, epoch, s) for s in range(1, w + 1)} <= seen
    marks: dict[tuple[str, str, int], int] = {}
    for page in pages:
        marks.update(page.watermarks)
    assert marks == {("e1", "s", EPOCH): 17, ("e2", "t", EPOCH): 6}


async def test_a_record_larger_than_the_budget_comes_alone(migrated: str) -> None:
    """A page starting at a record above the budget holds it and nothing else (it
    advances); a page before it stops short of it."""
    async with connected(migrated) as conn:
        await write(conn, COMMITS[:2], vouch=False)
        page = await read_page(conn, EARLIEST, limit=1000, max_bytes=50_000)
        assert [r.seq for r in page.records] == [*range(1, 12)]  # 41 KB: 12 would pass
        alone = await read_page(conn, page.cursor, limit=1000, max_bytes=1000)
        assert [r.seq for r in alone.records] == [12]
        assert not alone.caught_up and alone.cursor == alone.records[0].position
        rest = await read_page(conn, alone.cursor, limit=1000, max_bytes=BUDGET)
        assert [r.seq for r in rest.records] == [*range(13, 18)] and rest.caught_up


async def test_rows_written_out_of_seq_order_are_still_cut_in_position_order(
    migrated: str
) -> None:
    """Rows whose index order is not their seq order (written in reverse): the page is
    still the records up to the budget in position order, never a later one instead of
    an earlier one, and the next page resumes after it."""
    async with connected(migrated) as conn:
        await write(conn, COMMITS[:1], vouch=False, reverse=True)
        after, got, sizes = EARLIEST, [], []
        while True:
            page = await read_page(conn, after, Filters(), limit=1000, max_bytes=7000)
            got += [r.seq for r in page.records]
            sizes.append(len(page.records))
            after = page.cursor
            if page.caught_up:
                break
    assert got == list(range(1, 11))
    assert sizes == [2, 2, 2, 2, 2]  # 3 KB records, 7,000 bytes a page


async def test_a_record_written_late_in_its_commit_is_not_passed_by_a_later_one(
    migrated: str
) -> None:
    """Seqs 1, 3, 4, 2, 5... written in that order (index order within a seq bucket is
    the order written): summed in that order, a 7,000-byte page would take seqs 1 and 3
    and end at 3, and the next page, after 3, would never hold seq 2. Summed in position
    order it holds 1 and 2."""
    async with connected(migrated) as conn:
        await write(conn, COMMITS[:1], vouch=False, order=[0, 2, 3, 1, *range(4, 10)])
        after, got = EARLIEST, []
        while True:
            page = await read_page(conn, after, Filters(), limit=1000, max_bytes=7000)
            got += [r.seq for r in page.records]
            after = page.cursor
            if page.caught_up:
                break
    assert got == list(range(1, 11))


async def test_the_consumer_sdk_batches_by_bytes_and_resumes_from_a_checkpoint_mid_commit(
    migrated: str
) -> None:
    """Subscription(batch_max_bytes=16 KiB): batches within the budget (or one record);
    a checkpoint taken inside a commit resumes exactly after it in the next process:
    every record once across both."""
    async with connected(migrated) as conn:
        await write(conn, COMMITS, vouch=True)
    first: list[FeedRecord] = []
    async with Subscription(migrated, "bytes", batch_max_bytes=BUDGET,
                            stop_when_caught_up=True) as sub:
        for _ in range(3):
            batch = await anext(aiter(sub))
            check_bounded(batch.records)
            first += batch.records
        await sub.commit()
        assert ord_of(int(sub.committed_cursor)) != ORD_END  # inside a commit
        await anext(aiter(sub))  # read, not committed: comes again
    rest: list[FeedRecord] = []
    async with Subscription(migrated, "bytes", batch_max_bytes=BUDGET,
                            stop_when_caught_up=True) as again:
        async for batch in again:
            check_bounded(batch.records)
            rest += batch.records
        assert again.completeness() == {("e1", "s", EPOCH): 17, ("e2", "t", EPOCH): 6}
    assert [r.identity for r in first + rest] == IDS
