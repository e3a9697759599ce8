"""Data at rest (issue 13): records in day partitions created ahead, an existing
table migrated with its rows, retention that drops whole partitions and leaves the
completeness accounting exact (a retired record is never "missing")."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from nats.aio.msg import Msg

from broker.errors import InvalidInput
from broker.feed import Filters, read_page
from broker.feed.positions import EARLIEST
from broker.feed.reading import completeness_at, head_cursor
from broker.pg_connecting import connected
from broker.protocol.topology import Topology
from broker.protocol.wire import CT_JSON, Batch, Record
from cloud_ingest.ingesting import init_connection
from cloud_ingest.maintenance import maintain_once
from cloud_ingest.metrics import IngestMetrics
from cloud_ingest.partitioning import ensure_partitions, list_partitions
from cloud_ingest.retention import enforce_retention, parse_keep, set_retention
from cloud_ingest.schema import migrate
from cloud_ingest.writing import GroupWriter
from tests.helpers import until
from tests.support.batches import json_batch_msg

EPOCH = 3


@pytest.fixture
def conn(migrated_conn: asyncpg.Connection) -> asyncpg.Connection:
    return migrated_conn


def _msg(edge: str, stream: str, first: int, n: int) -> Msg:
    return json_batch_msg(edge, stream, EPOCH, first, n)


async def _write(dsn: str, *msgs: Msg) -> None:
    """One group through the ingest's writer, on an ingest-codec connection."""
    async with connected(dsn) as c:
        await init_connection(c)
        gw = GroupWriter(Topology())
        await gw.write(c, [gw.decode(m) for m in msgs])


async def _completeness(c: asyncpg.Connection) -> dict[tuple[str, str], dict[str, Any]]:
    rows = await c.fetch(
        "SELECT stream, edge_id, committed_records, watermark, missing_records, "
        "retired_records FROM v_completeness")
    return {(r["edge_id"], r["stream"]): dict(r) for r in rows}


async def test_the_ingest_keeps_partitions_created_ahead_idempotently_from_several_processes(
    conn: asyncpg.Connection, pg_dsn: str
) -> None:
    """Today's partition and the next days' exist after the migration; creating them
    again from three connections at once creates each missing one exactly once."""
    today = datetime.now(UTC).date()
    days = {p.day for p in await list_partitions(conn)}
    assert {today + timedelta(days=i) for i in range(4)} <= days
    others = [await asyncpg.connect(pg_dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(*(ensure_partitions(o, 10) for o in others))
    finally:
        for o in others:
            await o.close()
    created = [name for r in results for name in r]
    assert len(created) == len(set(created)) == 7  # days 4..10, once each
    assert await ensure_partitions(conn, 10) == []
    kinds = await conn.fetchval("SELECT relkind::text FROM pg_class WHERE relname = 'records'")
    assert kinds == "p"


async def test_a_write_on_a_day_without_a_partition_creates_it_rather_than_dead_letter(
    conn: asyncpg.Connection,
) -> None:
    """If the upkeep fell behind, the writer creates the missing day's partition and the
    rows commit; nothing is refused."""
    await init_connection(conn)
    later = datetime.now(UTC) + timedelta(days=20)
    us = int(later.timestamp() * 1_000_000)
    gw = GroupWriter(Topology())
    batch = Batch(1, "e", "s", EPOCH, 1, [Record(1, CT_JSON, b"{}")])
    async with conn.transaction():
        await gw._insert(conn, GroupWriter.rows(batch, us))
    assert later.date() in {p.day for p in await list_partitions(conn)}
    assert await conn.fetchval("SELECT count(*) FROM records") == 1


async def test_an_existing_unpartitioned_table_is_moved_with_its_rows(pg_dsn: str) -> None:
    """Rows written before migration 008, over three days, end up in one partition per
    day, readable through the views and the feed as before."""
    async with connected(pg_dsn) as c:
        await migrate(c, upto=7)
        days = [datetime(2026, 3, d, 12, tzinfo=UTC) for d in (1, 2, 4)]
        for i, rx in enumerate(days):
            first = i * 10 + 1
            async with c.transaction():
                await c.execute(
                    "INSERT INTO records (edge_id, stream, epoch, seq, event_time, received_at,"
                    " payload) SELECT 'e', 's', $1, s, $2, $2, jsonb_build_object('n', s)"
                    " FROM generate_series($3::int8, $3 + 9) AS s", EPOCH, rx, first)
                await c.execute(
                    "INSERT INTO committed_ranges (edge_id, stream, epoch, ranges) VALUES "
                    "('e', 's', $1, int8multirange(int8range(1, $2))) ON CONFLICT "
                    "(edge_id, stream, epoch) DO UPDATE SET ranges = EXCLUDED.ranges",
                    EPOCH, first + 10)
                await c.execute(
                    "INSERT INTO feed_commits (rows, edge_ids, streams, epochs, first_seqs, "
                    "last_seqs, wm_edge_ids, wm_streams, wm_epochs, watermarks) VALUES "
                    "(10, '{e}', '{s}', ARRAY[$1::int8], ARRAY[$2::int8], ARRAY[$2 + 9::int8], "
                    "'{e}', '{s}', ARRAY[$1::int8], ARRAY[$2 + 9::int8])", EPOCH, first)
        assert await migrate(c, upto=8) == [8]
        partitions = {p.day for p in await list_partitions(c)}
        assert {date(2026, 3, d) for d in (1, 2, 3, 4)} <= partitions
        per_day = await c.fetch(
            "SELECT tableoid::regclass::text AS p, count(*) FROM records GROUP BY 1 ORDER BY 1")
        assert [(r[0], r[1]) for r in per_day] == [
            ("records_p20260301", 10), ("records_p20260302", 10), ("records_p20260304", 10)]
        await migrate(c)  # the code reads the current layout (010 moves the rows again)
        assert await c.fetchval("SELECT count(*) FROM v_records") == 30
        assert await c.fetchval(
            "SELECT count(*) FROM feed_commits WHERE received_at IS NOT NULL") == 3
        page = await read_page(c, EARLIEST, Filters(), limit=100)
        assert [r.seq for r in page.records] == list(range(1, 31))
        assert page.records[0].payload == {"n": 1}
        assert await c.fetchval("SELECT count(*) FROM v_feed") == 30


async def test_retention_drops_whole_partitions_and_retired_records_are_not_missing(
    conn: asyncpg.Connection, pg_dsn: str
) -> None:
    """Two streams share today's partition, one kept 1 day and one 30: the partition
    stays until both are past retention, then is dropped whole. The completeness view
    counts its rows as retired, never as missing, the watermark does not move back,
    a redelivery of a retired batch is not stored again, and the feed's completeness
    at the head is what it was."""
    await _write(pg_dsn, _msg("e1", "short", 1, 40), _msg("e1", "long", 1, 25))
    await set_retention(conn, "short", parse_keep("1d"))
    await set_retention(conn, "long", parse_keep("30d"))
    before = await _completeness(conn)
    head_before = await completeness_at(conn, await head_cursor(conn))
    now = datetime.now(UTC)
    metrics = IngestMetrics()

    report = await enforce_retention(conn, now=now + timedelta(days=5), metrics=metrics)
    today = f"records_p{now:%Y%m%d}"
    assert all(r.rows == 0 for r in report.retired)  # only empty days went
    assert report.kept[today] == "stream 'long' keeps 30d"
    assert await conn.fetchval("SELECT count(*) FROM records") == 65

    _, report = await maintain_once(conn, 3, now=now + timedelta(days=32), metrics=metrics)
    dropped = {r.partition: r for r in report.retired}
    assert dropped[today].rows == 65 and dropped[today].streams == ("long", "short")
    assert await conn.fetchval("SELECT to_regclass($1)", today) is None
    assert await conn.fetchval("SELECT count(*) FROM records") == 0
    after = await _completeness(conn)
    for key, was in before.items():
        assert after[key]["missing_records"] == 0
        assert after[key]["watermark"] == was["watermark"]
        assert after[key]["retired_records"] == was["committed_records"]
    assert metrics.records_retired._value.get() == 65
    assert metrics.partitions_dropped._value.get() >= 1
    assert await conn.fetchval(
        "SELECT rows FROM retired_partitions WHERE name = $1", today) == 65

    await _write(pg_dsn, _msg("e1", "short", 1, 40))  # a late redelivery
    assert await conn.fetchval("SELECT count(*) FROM records") == 0
    assert (await _completeness(conn))[("e1", "short")]["missing_records"] == 0
    assert await conn.fetchval("SELECT count(*) FROM feed_commits WHERE rows > 0") == 0
    assert await completeness_at(conn, await head_cursor(conn)) == head_before
    page = await read_page(conn, EARLIEST, Filters(), limit=100)
    assert page.records == [] and page.caught_up


async def test_a_partition_with_a_stream_without_retention_is_kept(
    conn: asyncpg.Connection, pg_dsn: str
) -> None:
    """No setting and no default means kept forever: retention never guesses; the
    default ``*`` then lets it go."""
    await _write(pg_dsn, _msg("e1", "audit", 1, 5))
    later = datetime.now(UTC) + timedelta(days=400)
    report = await enforce_retention(conn, now=later)
    assert sum(r.rows for r in report.retired) == 0
    assert "no retention" in next(iter(report.kept.values()))
    await set_retention(conn, "*", parse_keep("52w"))
    report = await enforce_retention(conn, now=later)
    assert sum(r.rows for r in report.retired) == 5


@pytest.mark.parametrize("bad", ["30", "0d", "30m", "10x", "-1d", ""])
def test_a_retention_is_hours_days_or_weeks_of_at_least_an_hour(bad: str) -> None:
    with pytest.raises(InvalidInput):
        parse_keep(bad)


async def test_a_stream_name_that_is_not_a_token_is_refused(conn: asyncpg.Connection) -> None:
    with pytest.raises(InvalidInput, match="stream"):
        await set_retention(conn, "a.b", parse_keep("1d"))


async def test_a_redelivery_racing_its_first_delivery_is_stored_once(pg_dsn: str) -> None:
    """``records`` has no unique index (partitions cannot share one): a batch written by
    a second worker while the first still holds it uncommitted is noticed when the
    second takes the keys' lock, undone and not stored again."""
    a, b = await asyncpg.connect(pg_dsn), await asyncpg.connect(pg_dsn)
    await migrate(a)
    try:
        for c in (a, b):
            await init_connection(c)
        gw = GroupWriter(Topology())
        tx = a.transaction()
        await tx.start()
        await gw.write(a, [gw.decode(_msg("e", "s", 1, 30))])  # holds the key's lock
        second = asyncio.create_task(gw.write(b, [gw.decode(_msg("e", "s", 1, 30))]))
        b_pid = b.get_server_pid()

        async def b_waits_for_a() -> bool:
            blockers = await a.fetchval("SELECT pg_blocking_pids($1)", b_pid)
            return a.get_server_pid() in blockers

        await until(b_waits_for_a, timeout=10, message="the second write never waited")
        assert not second.done()
        await tx.commit()
        result = await asyncio.wait_for(second, 10)
        assert result.inserted == 0
        assert await a.fetchval("SELECT count(*) FROM records") == 30
        assert await a.fetchval("SELECT sum(rows) FROM feed_commits") == 30
    finally:
        await a.close()
        await b.close()


async def _cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "retention", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"})
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_the_retention_commands_set_list_and_apply(
    conn: asyncpg.Connection, pg_dsn: str
) -> None:
    """`edgesync retention set` stores a setting, `list --json` shows it with the
    partitions, `apply` runs a round, and a malformed duration is refused (exit 1)."""
    await conn.execute("INSERT INTO stream_keys (edge_id, stream, epoch) VALUES ('e1', 'temps', 1)")
    code, out = await _cli("set", "temps", "30d", "--dsn", pg_dsn)
    assert code == 0 and "note:" not in out, out
    assert out.strip() == "temps: kept 30d", "only the command's own output (no log lines)"
    code, out = await _cli("set", "temsp", "30d", "--dsn", pg_dsn)  # a typo: set, and said
    assert code == 0 and "no records of a stream 'temsp' yet (a typo?)" in out, out
    assert (await _cli("unset", "temsp", "--dsn", pg_dsn))[0] == 0
    assert (await _cli("set", "*", "2w", "--dsn", pg_dsn))[0] == 0
    code, out = await _cli("list", "--json", "--dsn", pg_dsn)
    assert code == 0
    listed = json.loads(out)
    assert listed["retention"] == {"temps": "30d", "*": "2w"}
    assert len(listed["partitions"]) >= 4
    code, out = await _cli("set", "temps", "30 days", "--dsn", pg_dsn)
    assert code == 1 and "hours, days or weeks" in out
    code, out = await _cli("set", "a.b", "1d", "--dsn", pg_dsn)
    assert code == 1 and "invalid stream" in out
    assert (await _cli("unset", "temps", "--dsn", pg_dsn))[0] == 0
    code, out = await _cli("apply", "--dsn", pg_dsn)
    assert code == 0 and out.strip(), "apply says what it did, even when it did nothing"
    assert await conn.fetchval("SELECT count(*) FROM stream_retention") == 1
