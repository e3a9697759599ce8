"""Compact rows at rest (migration 010, issue 13): the payload stored as the JSON text
the producer sent, (edge, stream, epoch) as one ``stream_keys`` id, and every view
showing what it showed before."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest

from broker.feed import Filters, read_page
from broker.feed.positions import EARLIEST
from broker.pg_connecting import connected
from broker.protocol.topology import Topology
from broker.protocol.wire import CT_JSON, CT_RAW, Batch, Record
from cloud_ingest import writing
from cloud_ingest.ingesting import init_connection
from cloud_ingest.schema import migrate
from cloud_ingest.writing import GroupWriter
from tests.support.batches import batch_msg

EPOCH = 7_000_000_000_000_000_001

# Every view that shows records, ordered so that two readings compare row for row.
_VIEWS = {
    "v_records": "SELECT * FROM v_records ORDER BY edge_id, stream, epoch, seq",
    "v_feed": "SELECT * FROM v_feed ORDER BY position",
    "v_completeness": "SELECT * FROM v_completeness ORDER BY edge_id, stream, epoch",
    "v_stream_progress": "SELECT * FROM v_stream_progress ORDER BY edge_id, stream, epoch",
}


# v_records as it read the 008 layout (views.sql holds only its 010 form, so a database
# at version 9 has none): the test creates it as a temporary view to read "before".
_V_RECORDS_BEFORE_010 = """CREATE TEMP VIEW v_records AS
    SELECT edge_id, stream, epoch, seq, event_time, received_at, key, headers,
           coalesce(payload, to_jsonb(encode(payload_raw, 'base64'))) AS payload,
           payload IS NULL AS payload_is_binary
    FROM records"""


async def _feed_before_010(conn: asyncpg.Connection, records: list[dict[str, Any]],
                           ) -> list[dict[str, Any]]:
    """What v_feed showed before 010, from its definition (docs/wire-format.md): every
    commit's records in commit order, at ``commit_id << 24 | offset in the commit``.
    The test's commits each hold one span, so the offset is ``seq - first_seq``."""
    by_key = {(r["edge_id"], r["stream"], r["epoch"], r["seq"]): r for r in records}
    feed = []
    for c in await conn.fetch("SELECT * FROM feed_commits ORDER BY commit_id"):
        (edge,), (stream,), (epoch,) = c["edge_ids"], c["streams"], c["epochs"]
        (first,), (last,) = c["first_seqs"], c["last_seqs"]
        for seq in range(first, last + 1):
            feed.append({"position": c["commit_id"] << 24 | seq - first,
                         "commit_id": c["commit_id"], "committed_at": c["committed_at"],
                         **by_key[(edge, stream, epoch, seq)]})
    return feed


async def _views(conn: asyncpg.Connection) -> dict[str, list[dict[str, Any]]]:
    return {name: [dict(r) for r in await conn.fetch(sql)] for name, sql in _VIEWS.items()}




async def test_migration_010_moves_existing_rows_and_every_view_reads_the_same(
    pg_dsn: str,
) -> None:
    """Rows written in 008's layout over two days (JSON and opaque payloads, headers,
    keys, two edges, two epochs) come through 010 with every view's rows unchanged,
    and the feed reads them all."""
    async with connected(pg_dsn) as c:
        await migrate(c, upto=9)
        days = [datetime(2026, 3, 1, 12, tzinfo=UTC), datetime(2026, 3, 2, 8, tzinfo=UTC)]
        rows = 0
        for d, rx in enumerate(days):
            await c.fetchval("SELECT es_records_partition($1)", rx.date())
            for edge, stream, epoch in (("e1", "s", EPOCH), ("e2", "s", 1), ("e1", "t", 2)):
                first = d * 5 + 1
                async with c.transaction():
                    await c.execute(
                        "INSERT INTO records (edge_id, stream, epoch, seq, event_time, "
                        " received_at, key, headers, payload, payload_raw) "
                        "SELECT $1, $2, $3, s, $4::timestamptz + s * interval '1 ms', $4, "
                        "  CASE WHEN s % 2 = 0 THEN 'k' || s END, "
                        "  CASE WHEN s % 3 = 0 THEN jsonb_build_object('h', s::text) END, "
                        "  CASE WHEN s % 4 <> 0 THEN jsonb_build_object('n', s, 'x', "
                        "    jsonb_build_array(1.5, 'é', null, true)) END, "
                        "  CASE WHEN s % 4 = 0 THEN decode('00ff' || lpad(s::text, 4, '0'), "
                        "    'hex') END "
                        "FROM generate_series($5::int8, $5 + 4) AS s",
                        edge, stream, epoch, rx, first)
                    await c.execute(
                        "INSERT INTO committed_ranges (edge_id, stream, epoch, ranges) "
                        "VALUES ($1, $2, $3, int8multirange(int8range(1, $4))) "
                        "ON CONFLICT (edge_id, stream, epoch) DO UPDATE "
                        "SET ranges = EXCLUDED.ranges", edge, stream, epoch, first + 5)
                    await c.execute(
                        "INSERT INTO feed_commits (rows, edge_ids, streams, epochs, "
                        "first_seqs, last_seqs, wm_edge_ids, wm_streams, wm_epochs, "
                        "watermarks, received_at) VALUES (5, ARRAY[$1], ARRAY[$2], "
                        "ARRAY[$3::int8], ARRAY[$4::int8], ARRAY[$4 + 4::int8], ARRAY[$1], "
                        "ARRAY[$2], ARRAY[$3::int8], ARRAY[$4 + 4::int8], $5)",
                        edge, stream, epoch, first, rx)
                rows += 5
        await c.execute(_V_RECORDS_BEFORE_010)
        before_records = [dict(r) for r in await c.fetch(_VIEWS["v_records"])]
        await c.execute("DROP VIEW pg_temp.v_records")
        before = {"v_records": before_records,
                  "v_feed": await _feed_before_010(c, before_records),
                  **{name: [dict(r) for r in await c.fetch(sql)] for name, sql in _VIEWS.items()
                     if name not in ("v_records", "v_feed")}}
        assert len(before["v_records"]) == len(before["v_feed"]) == rows

        assert await migrate(c, upto=10) == [10]

        assert await _views(c) == before
        assert await c.fetchval("SELECT count(*) FROM stream_keys") == 3
        per_day = await c.fetch(
            "SELECT tableoid::regclass::text AS p, count(*) FROM records GROUP BY 1 ORDER BY 1")
        assert [(r[0], r[1]) for r in per_day] == [
            ("records_p20260301", rows // 2), ("records_p20260302", rows // 2)]
        await migrate(c)  # the reader reads the latest schema (its commits' sizes: 013)
        page = await read_page(c, EARLIEST, Filters(), limit=100)
        assert [(r.edge, r.stream, r.epoch, r.seq) for r in page.records] == [
            (r["edge_id"], r["stream"], r["epoch"], r["seq"]) for r in before["v_feed"]]
        binary = [r for r in page.records if isinstance(r.payload, bytes)]
        assert binary and all(r.payload[:2] == b"\x00\xff" for r in binary)
        # the old table and its partitions are gone; new days get the new layout
        assert await c.fetchval("SELECT to_regclass('records_v8')") is None
        later = datetime.now(UTC).date() + timedelta(days=40)
        new = await c.fetchval("SELECT es_records_partition($1)", later)
        assert new == f"records_p{later:%Y%m%d}"
        assert await c.fetchval(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = $1::regclass AND attname = 'payload'", new) == "json"


async def test_the_stream_keys_cache_is_bounded_and_still_answers_every_key(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An edge that invents epochs cannot grow a writer's id cache without bound: past
    the limit the cache keeps the keys of the call at hand, and every call still gets
    the id of each key it asked for (the ones in the table)."""
    monkeypatch.setattr(writing, "MAX_CACHED_STREAM_KEYS", 50)
    async with connected(pg_dsn) as c:
        await migrate(c)
        writer = GroupWriter(Topology())
        for start in range(0, 200, 30):
            keys = {("edge-x", "s", epoch) for epoch in range(start, start + 30)}
            ids = await writer.stream_keys(c, keys)
            table = {(r[0], r[1], r[2]): r[3] for r in await c.fetch(
                "SELECT edge_id, stream, epoch, id FROM stream_keys")}
            assert {k: ids[k] for k in keys} == {k: table[k] for k in keys}
            assert len(writer._keys) <= 50
        assert await c.fetchval("SELECT count(*) FROM stream_keys") == 210


async def test_a_session_that_made_partitions_before_010_makes_them_in_the_new_layout(
    pg_dsn: str,
) -> None:
    """An ingest connected across the upgrade (its session has run
    es_records_partition against 008's table) creates the next day's partition as a
    partition of 010's table, with 010's columns."""
    before, upgrader = await asyncpg.connect(pg_dsn), await asyncpg.connect(pg_dsn)
    try:
        await migrate(before, upto=9)
        today = datetime.now(UTC).date()
        for ahead in range(2):  # twice: plpgsql keeps the session's plans from here on
            await before.fetchval("SELECT es_records_partition($1)", today + timedelta(ahead))
        await migrate(upgrader)
        later = today + timedelta(days=50)
        name = await before.fetchval("SELECT es_records_partition($1)", later)
        assert name == f"records_p{later:%Y%m%d}"
        assert await before.fetchval(
            "SELECT inhparent::regclass::text FROM pg_inherits "
            "WHERE inhrelid = $1::regclass", name) == "records"
        assert await before.fetchval(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = $1::regclass AND attname = 'payload'", name) == "json"
        assert await before.fetchval("SELECT es_records_partition($1)", later) is None
    finally:
        await before.close()
        await upgrader.close()


async def test_names_round_trip_through_the_stream_keys_dictionary(pg_dsn: str) -> None:
    """Each (edge, stream, epoch) gets one id, whichever writer meets it first; the views
    and the feed show the names; an id added by a transaction that rolled back is never
    used for rows."""
    async with connected(pg_dsn) as c:
        await migrate(c)
        await init_connection(c)
        keys = [("edge-1", "temperature", EPOCH), ("edge-1", "s", 1), ("e_2", "s", 1)]
        first, second = GroupWriter(Topology()), GroupWriter(Topology())
        async with c.transaction():  # added inside a caller's transaction, then committed
            await first.stream_keys(c, keys[:1])
        assert await c.fetchval("SELECT count(*) FROM stream_keys") == 1
        for n, (edge, stream, epoch) in enumerate(keys):
            writer = first if n % 2 == 0 else second
            batch = Batch(1, edge, stream, epoch, 1, [
                Record(1_700_000_000_000_000 + s, CT_JSON, b'{"s":%d}' % s) for s in (1, 2)])
            await writer.write(c, [writer.decode(batch_msg(batch))])
        ids = {(r[0], r[1], r[2]): r[3] for r in await c.fetch(
            "SELECT edge_id, stream, epoch, id FROM stream_keys")}
        assert set(ids) == set(keys)
        assert (await first.stream_keys(c, keys)) == (await second.stream_keys(c, keys)) == ids
        shown = [(r[0], r[1], r[2]) for r in await c.fetch(
            "SELECT DISTINCT edge_id, stream, epoch FROM v_records")]
        assert sorted(shown) == sorted(keys)
        page = await read_page(c, EARLIEST, Filters(streams=("temperature",)))
        assert [(r.edge, r.stream, r.epoch, r.seq) for r in page.records] == [
            ("edge-1", "temperature", EPOCH, 1), ("edge-1", "temperature", EPOCH, 2)]
        orphans = await c.fetchval(
            "SELECT count(*) FROM records r WHERE NOT EXISTS "
            "(SELECT 1 FROM stream_keys k WHERE k.id = r.stream_key)")
        assert orphans == 0


async def test_a_new_key_looked_up_in_a_rolled_back_transaction_is_not_cached(
    pg_dsn: str,
) -> None:
    """The id of a key added inside a transaction that rolls back disappears with it: the
    writer must not keep it, or its next rows would point at nothing."""
    async with connected(pg_dsn) as c:
        await migrate(c)
        await init_connection(c)
        writer = GroupWriter(Topology())
        key = ("e", "s", 3)
        tr = c.transaction()
        await tr.start()
        gone = (await writer.stream_keys(c, [key]))[key]
        await tr.rollback()
        batch = Batch(1, *key, 1, [Record(1_700_000_000_000_000, CT_JSON, b"{}")])
        await writer.write(c, [writer.decode(batch_msg(batch))])
        assert await c.fetchval("SELECT count(*) FROM v_records") == 1
        kept = await c.fetchval("SELECT id FROM stream_keys WHERE (edge_id, stream, epoch) "
                                "= ($1, $2, $3)", *key)
        assert kept != gone


async def test_a_json_payload_is_stored_as_the_bytes_the_producer_sent(pg_dsn: str) -> None:
    """The stored text is the producer's, byte for byte (spacing, key order, number
    spelling, escapes); the views give it as jsonb, the feed decodes it as a JSON
    decoder decodes those bytes, and an opaque payload stays its bytes."""
    sent = [
        b'{"z":1,"a":[1.50,2e3,-0],"s":"caf\\u00e9 \\"q\\"","n":null}',
        b'{ "spaced" : true ,\n "big": 123456789012345678901234567890 }',
        b'[]',
        b'"just a string"',
    ]
    async with connected(pg_dsn) as c:
        await migrate(c)
        await init_connection(c)
        writer = GroupWriter(Topology())
        us = time.time_ns() // 1000
        recs = [Record(us + i, CT_JSON, p, None, {"h": "v"} if i == 0 else None)
                for i, p in enumerate(sent)]
        recs.append(Record(us + 9, CT_RAW, b"\x00\x01\xff", "k"))
        batch = Batch(1, "e", "s", 1, 1, recs)
        await writer.write(c, [writer.decode(batch_msg(batch))])
        stored = await c.fetch("SELECT payload, payload_raw FROM records ORDER BY seq")
        assert [r[0] for r in stored[:4]] == sent  # the ingest's codec gives the bytes
        assert stored[4][1] == b"\x00\x01\xff"
        viewed = await c.fetch(
            "SELECT payload::text, payload_is_binary, headers::text FROM v_records "
            "ORDER BY seq")
        assert [r[0] for r in viewed[:4]] == [
            await c.fetchval("SELECT convert_from($1, 'UTF8')::jsonb::text", p) for p in sent]
        assert [r[1] for r in viewed] == [False] * 4 + [True]
        assert viewed[0][2] == '{"h": "v"}'
        page = await read_page(c, EARLIEST, Filters())
        assert [r.payload for r in page.records] == [
            *(msgspec.json.decode(p) for p in sent), b"\x00\x01\xff"]
        assert page.records[0].headers == {"h": "v"} and page.records[1].headers is None
        assert page.records[4].key == "k"
