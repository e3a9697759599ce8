"""After a group that found nothing accounted, the writer COPYs its next group without
reading what the keys account first: the merge's own check (a seq it commits is
accounted already) finds a redelivery, which is then undone and redone under the
keys' locks (cloud_ingest.writing, step 2). Whatever the path, every record is stored
once and every dead letter is written and counted once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

import asyncpg
import pytest
import structlog

from broker.protocol.topology import Topology
from broker.protocol.wire import CT_JSON, Batch, Record
from cloud_ingest import writing
from cloud_ingest.ingesting import init_connection
from cloud_ingest.writing import GroupResult, GroupWriter
from tests.support.batches import batch_msg, json_batch_msg

EPOCH = 13
TS = 1_700_000_000_000_000


@pytest.fixture
async def conn(migrated_conn: asyncpg.Connection) -> asyncpg.Connection:
    await init_connection(migrated_conn)
    return migrated_conn


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """The ``lock`` argument of each read of what a group's keys account (the real
    read runs)."""
    calls: list[bool] = []
    real = writing.accounted_seqs

    async def counted(*args: object, lock: bool, **kwargs: object) -> object:
        calls.append(lock)
        return await real(*args, lock=lock, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(writing, "accounted_seqs", counted)
    yield calls


def _batch(first: int, payloads: list[bytes], *, keys: list[str | None] | None = None
           ) -> Batch:
    return Batch(1, "e1", "s", EPOCH, first,
                 [Record(TS + i, CT_JSON, p, key=(keys[i] if keys else None))
                  for i, p in enumerate(payloads)])


async def _clean_group(conn: asyncpg.Connection, gw: GroupWriter, first: int) -> None:
    """A group of new records on another edge: afterwards ``gw`` writes optimistically."""
    await gw.write(conn, [gw.decode(json_batch_msg("e9", "s", EPOCH, first, 5))])


async def _written_twice(conn: asyncpg.Connection, gw: GroupWriter, reads: list[bool],
                         write: Callable[[], Awaitable[GroupResult]]
                         ) -> tuple[GroupResult, GroupResult]:
    """``write`` a group, then a clean one (``gw`` now writes without the read), then the
    same group again (a redelivery): ``reads`` then holds only the redelivery's reads."""
    first = await write()
    await _clean_group(conn, gw, 1)
    reads.clear()
    return first, await write()


async def _stored(conn: asyncpg.Connection, edge: str) -> list[tuple[int, int]]:
    rows = await conn.fetch("SELECT seq, count(*) AS n FROM v_records WHERE edge_id = $1 "
                            "GROUP BY seq ORDER BY seq", edge)
    return [(r["seq"], r["n"]) for r in rows]


async def test_a_redelivery_written_without_a_read_is_undone_and_stored_once(
    conn: asyncpg.Connection, reads: list[bool],
) -> None:
    gw = GroupWriter(Topology())
    await gw.write(conn, [gw.decode(json_batch_msg("e1", "s", EPOCH, 1, 10))])
    assert reads == [False]  # a writer that has not written yet reads first
    await gw.write(conn, [gw.decode(json_batch_msg("e1", "s", EPOCH, 11, 10))])
    assert reads == [False], "the group after a clean one was read first"
    with structlog.testing.capture_logs() as logs:
        again = await gw.write(conn, [gw.decode(json_batch_msg("e1", "s", EPOCH, 6, 10))])
    # Not read first; the merge found 6-15 accounted, and the group was redone locked.
    assert reads == [False, True]
    assert [e.get("read_first") for e in logs if e["event"] == "group_raced_redelivery"] == [
        False]
    assert again.inserted == 0
    assert await _stored(conn, "e1") == [(s, 1) for s in range(1, 21)]
    # A group that met a redelivery makes the next one read first again.
    await gw.write(conn, [gw.decode(json_batch_msg("e1", "s", EPOCH, 21, 10))])
    assert reads == [False, True, False]
    assert await conn.fetchval(
        "SELECT watermark FROM v_completeness WHERE edge_id = 'e1' AND stream = 's'") == 30


async def test_a_redelivered_batch_of_bad_records_is_read_first_and_not_counted_again(
    conn: asyncpg.Connection, reads: list[bool],
) -> None:
    """The merge checks only seqs it commits: a batch whose records are all bad commits
    none, so its records' letters are what the read before the COPY says were written."""
    gw = GroupWriter(Topology())
    bad = batch_msg(_batch(1, [b"{nope"] * 4))
    first, again = await _written_twice(conn, gw, reads,
                                        lambda: gw.write(conn, [gw.decode(bad)]))
    assert reads == [False]
    assert (first.dead_lettered_records, again.dead_lettered_records) == (4, 0)
    assert await conn.fetchval("SELECT count(*) FROM dead_letters WHERE edge_id = 'e1'") == 4


async def test_a_redelivery_whose_json_postgres_refuses_is_read_after_the_refusal(
    conn: asyncpg.Connection, reads: list[bool],
) -> None:
    """JSON syntax left to PostgreSQL: the redelivered group's bad payload is known only
    once PostgreSQL refuses its COPY; the read then finds the group written before."""
    gw = GroupWriter(Topology())
    msg = batch_msg(_batch(1, [b'{"ok": 1}', b"{nope", b'{"ok": 3}']))

    async def write() -> GroupResult:  # as the ingest decodes, validates and writes
        group = [gw.decode(msg, validate=False, json_syntax=False)]
        gw.validate(group, json_syntax=False)
        assert group[0].bad == {}  # left to PostgreSQL
        return await gw.write(conn, group)

    first, again = await _written_twice(conn, gw, reads, write)
    assert reads == [False]
    assert (first.inserted, first.dead_lettered_records) == (2, 1)
    assert (again.inserted, again.dead_lettered_records) == (0, 0)
    assert await _stored(conn, "e1") == [(1, 1), (3, 1)]
    letters = await conn.fetch("SELECT seq, reason FROM dead_letters WHERE edge_id = 'e1'")
    assert [r["seq"] for r in letters] == [2]
    assert "PostgreSQL" not in letters[0]["reason"]  # the validator's, after the refusal


async def test_a_redelivery_with_a_row_postgres_refuses_is_redone_with_the_read(
    conn: asyncpg.Connection, reads: list[bool],
) -> None:
    """A rule the validator does not know (a CHECK in PostgreSQL) refuses a row of a
    group written without the read: the group is undone and redone with it, so the row's
    letter, written by the first delivery, is neither written nor counted again."""
    await conn.execute("ALTER TABLE records ADD CONSTRAINT no_forbidden "
                       "CHECK (key IS DISTINCT FROM 'forbidden')")
    gw = GroupWriter(Topology())
    msg = batch_msg(_batch(1, [b"1", b"2", b"3", b"4"], keys=[None, "forbidden", None, None]))
    first, again = await _written_twice(conn, gw, reads,
                                        lambda: gw.write(conn, [gw.decode(msg)]))
    assert reads == [False]
    assert (first.inserted, first.dead_lettered_records) == (3, 1)
    assert (again.inserted, again.dead_lettered_records) == (0, 0)
    assert await _stored(conn, "e1") == [(1, 1), (3, 1), (4, 1)]
    letters = await conn.fetch("SELECT seq, reason FROM dead_letters WHERE edge_id = 'e1'")
    assert [r["seq"] for r in letters] == [2] and "no_forbidden" in letters[0]["reason"]
