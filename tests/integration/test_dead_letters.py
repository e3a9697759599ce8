"""Bad input on the records stream is dead-lettered alone, accounted, and replayable;
nothing stops the ingest or stalls a stream (issue 10, sections 0 and 1)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import nats
import pytest

from broker.pg_connecting import connected
from broker.protocol.wire import CT_JSON, CT_RAW, Batch, Record, encode_batch
from broker.runtime.embedded_nats import EmbeddedNats
from cloud_ingest.dead_letters import NotReplayable, replay_dead_letter
from tests.helpers import until
from tests.integration.harness import running_ingest, wait_for_records

EPOCH = 42
GOOD = Record(1_700_000_000_000_000, CT_JSON, b'{"ok": true}')


def batch(edge: str, stream: str, first: int, records: list[Record]) -> Batch:
    return Batch(1, edge, stream, EPOCH, first, records)


def good(n: int) -> list[Record]:
    return [GOOD] * n


class _AnyRecord(msgspec.Struct, array_like=True):
    """A record shape the wire's own Record type would refuse to encode."""

    ts: Any
    ct: Any
    payload: Any
    key: Any = None
    headers: Any = None


POISON: dict[str, _AnyRecord] = {
    "ts -2^63": _AnyRecord(-(2**63), CT_JSON, b"1"),
    "ts 2^63-1": _AnyRecord(2**63 - 1, CT_JSON, b"1"),
    "ts 1e18 µs (year 33658)": _AnyRecord(10**18, CT_JSON, b"1"),
    "ts as float": _AnyRecord(1.7e15, CT_JSON, b"1"),
    "ts beyond int64": _AnyRecord(2**64 - 1, CT_JSON, b"1"),
    "JSON with \\u0000": _AnyRecord(0, CT_JSON, b'{"a": "x\\u0000"}'),
    "not JSON": _AnyRecord(0, CT_JSON, b"{nope"),
    "JSON 1000 deep": _AnyRecord(0, CT_JSON, b"[" * 1000 + b"]" * 1000),
    "key with NUL": _AnyRecord(0, CT_RAW, b"x", "k\x00"),
    "header with NUL": _AnyRecord(0, CT_RAW, b"x", None, {"h": "\x00"}),
    "unknown ct": _AnyRecord(0, 7, b"x"),
    "payload not bytes": _AnyRecord(0, CT_RAW, 12),
}


def encode_mixed(edge: str, stream: str, first: int, records: list[Any]) -> bytes:
    """A batch body whose records may be anything MessagePack can carry."""
    return msgspec.msgpack.encode({
        "v": 1, "edge": edge, "stream": stream, "epoch": EPOCH, "first_seq": first,
        "records": records,
    })


@pytest.fixture
async def pg(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    async with connected(pg_dsn) as conn:
        yield conn


async def completeness(conn: asyncpg.Connection, edge: str, stream: str) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT watermark, committed_records, dead_lettered_records, missing_records "
        "FROM v_completeness WHERE (edge_id, stream) = ($1, $2)", edge, stream)
    assert row is not None
    return row


async def test_garbage_spoofs_and_bad_records_are_dead_lettered_and_the_stream_moves_on(
    nats_server: EmbeddedNats, pg_dsn: str, pg: asyncpg.Connection
) -> None:
    """Garbage and a batch on another edge's subject are dead-lettered whole, without
    identity; bad records are dead-lettered one by one with theirs; the watermark
    passes them, so nothing after them waits."""
    async with running_ingest(pg_dsn, nats_server.url):
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        try:
            await js.publish("es.rec.e1.s", encode_batch(batch("e1", "s", 1, good(10)))[0])
            await js.publish("es.rec.e1.s", b"\x00\xffnot msgpack at all")
            spoof, _ = encode_batch(batch("e2", "s", 1, good(5)))
            await js.publish("es.rec.e1.s", spoof)  # e1's subject carrying e2's batch
            poison = [GOOD, Record(0, CT_JSON, b'{"bad": "\\u0000"}'), GOOD,
                      Record(0, CT_JSON, b"{not json")]
            await js.publish("es.rec.e1.s", encode_batch(batch("e1", "s", 11, poison))[0])
            await js.publish("es.rec.e1.s", encode_batch(batch("e1", "s", 15, good(10)))[0])
        finally:
            await nc.close()
        await wait_for_records(pg_dsn, 22)

        async def settled() -> bool:
            return int(await pg.fetchval("SELECT count(*) FROM dead_letters")) >= 4

        await until(settled, timeout=15)
        rows = await pg.fetch(
            "SELECT kind, reason, data, edge_id, epoch, seq, last_seq FROM dead_letters "
            "ORDER BY kind, seq")
        progress = await completeness(pg, "e1", "s")
    kinds = [(r["kind"], r["seq"]) for r in rows]
    assert kinds == [("message", None), ("message", None), ("record", 12), ("record", 14)]
    reasons = [r["reason"] for r in rows]
    assert any("malformed batch" in r for r in reasons)
    assert any("edge 'e2'" in r and "subject 'es.rec.e1.s'" in r for r in reasons)
    assert "\\u0000" in reasons[2] and "invalid JSON" in reasons[3]
    assert msgspec.msgpack.decode(rows[3]["data"], type=Record).payload == b"{not json"
    assert await _seqs(pg) == [*range(1, 12), 13, *range(15, 25)]
    assert (progress["watermark"], progress["dead_lettered_records"],
            progress["missing_records"]) == (24, 2, 0)


async def test_no_poison_value_stops_the_ingest_or_other_edges(
    nats_server: EmbeddedNats, pg_dsn: str, pg: asyncpg.Connection
) -> None:
    """Each poison value, straight on ES_RECORDS in a batch of good records: the good
    ones commit, each poison record is dead-lettered with its seq and a reason, and
    another edge's records keep committing all along."""
    async with running_ingest(pg_dsn, nats_server.url) as ingest:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        try:
            first = 1
            for n, (name, bad) in enumerate(POISON.items()):
                records = [GOOD, GOOD, bad, GOOD]
                await js.publish("es.rec.bad-edge.s",
                                 encode_mixed("bad-edge", "s", first, records))
                first += len(records)
                await js.publish("es.rec.other.s",
                                 encode_batch(batch("other", "s", n * 5 + 1, good(5)))[0])
                assert name
        finally:
            await nc.close()
        await wait_for_records(pg_dsn, len(POISON) * 5, where="edge_id = 'other'")
        await wait_for_records(pg_dsn, len(POISON) * 3, where="edge_id = 'bad-edge'")
        progress = await until(lambda: _complete(pg, "bad-edge", "s", first - 1), timeout=15)
        assert ingest.ready, "the ingest stopped"
        letters = await pg.fetch(
            "SELECT seq, reason FROM dead_letters WHERE kind = 'record' ORDER BY seq")
    assert [r["seq"] for r in letters] == [4 * i + 3 for i in range(len(POISON))]
    assert all(r["reason"] for r in letters)
    assert progress["dead_lettered_records"] == len(POISON)
    assert progress["missing_records"] == 0


async def test_a_record_postgres_refuses_is_isolated_and_replayed_exactly_once(
    nats_server: EmbeddedNats, pg_dsn: str, pg: asyncpg.Connection
) -> None:
    """A rule the validator does not know (a CHECK added in PostgreSQL) refuses the
    middle record of a batch: bisection commits the other 199, dead-letters that one
    with its identity; once the rule is lifted, replay lands it with its original
    identity, and a second replay changes nothing."""
    records = good(200)
    records[117] = Record(GOOD.ts, CT_JSON, b'{"ok": true}', key="forbidden")
    async with running_ingest(pg_dsn, nats_server.url):
        await pg.execute("ALTER TABLE records ADD CONSTRAINT no_forbidden "
                         "CHECK (key IS DISTINCT FROM 'forbidden')")
        await _publish(nats_server.url, records)
        await wait_for_records(pg_dsn, 199)
        progress = await until(lambda: _complete(pg, "e1", "s", 200), timeout=15)
    letter = await pg.fetchrow("SELECT id, seq, reason FROM dead_letters")
    assert letter["seq"] == 118
    assert "rejected by PostgreSQL" in letter["reason"]
    assert "no_forbidden" in letter["reason"]
    assert progress["dead_lettered_records"] == 1

    with pytest.raises(NotReplayable, match="no_forbidden"):
        await replay_dead_letter(pg, letter["id"])
    await pg.execute("ALTER TABLE records DROP CONSTRAINT no_forbidden")
    first = await replay_dead_letter(pg, letter["id"])
    again = await replay_dead_letter(pg, letter["id"])
    assert (first.inserted, first.already_replayed) == (1, False)
    assert (again.inserted, again.already_replayed) == (0, True)
    assert first.watermarks == [("e1", "s", EPOCH, 200)]
    row = await pg.fetchrow(
        "SELECT key, payload::text, event_time = to_timestamp($1 / 1e6) AS same_time "
        "FROM v_records WHERE seq = 118", GOOD.ts)
    assert (row["key"], row["payload"], row["same_time"]) == ("forbidden", '{"ok": true}', True)
    after = await completeness(pg, "e1", "s")
    assert (after["committed_records"], after["dead_lettered_records"]) == (200, 0)


@pytest.mark.parametrize("refusal", [
    "RAISE EXCEPTION 'refused by the trigger'",
    "ASSERT NEW.key <> 'refused', 'refused by the trigger'",
])
async def test_a_record_a_trigger_refuses_is_isolated_and_replayed_once_allowed(
    nats_server: EmbeddedNats, pg_dsn: str, pg: asyncpg.Connection, refusal: str
) -> None:
    """A trigger's refusal (RAISE EXCEPTION, a failed ASSERT) is the operator's rule, as
    a CHECK is: the record alone is dead-lettered with PostgreSQL's reason and the rest
    of its batch commits; replay answers still_invalid while the trigger refuses, and
    lands the record once it no longer does."""
    await _migrated(pg_dsn, nats_server)
    await pg.execute(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF NEW.key = 'refused' THEN {refusal}; END IF; RETURN NEW; END $$; "
        "CREATE TRIGGER refuse BEFORE INSERT ON records FOR EACH ROW "
        "EXECUTE FUNCTION refuse()")
    records = good(3)
    records[1] = Record(GOOD.ts, CT_JSON, b'{"ok": true}', key="refused")
    async with running_ingest(pg_dsn, nats_server.url):
        await _publish(nats_server.url, records)
        progress = await until(lambda: _complete(pg, "e1", "s", 3), timeout=15)
    letter = await pg.fetchrow("SELECT id, kind, seq, last_seq, reason FROM dead_letters")
    assert (letter["kind"], letter["seq"], letter["last_seq"]) == ("record", 2, 2)
    assert "refused by the trigger" in letter["reason"]
    assert await _seqs(pg) == [1, 3]
    assert progress["dead_lettered_records"] == 1

    with pytest.raises(NotReplayable, match="refused by the trigger") as refused:
        await replay_dead_letter(pg, letter["id"])
    assert refused.value.code == "still_invalid"
    await pg.execute("DROP TRIGGER refuse ON records")
    assert (await replay_dead_letter(pg, letter["id"])).inserted == 1
    assert await _seqs(pg) == [1, 2, 3]


async def test_an_unexpected_failure_is_contained_to_its_message(
    nats_server: EmbeddedNats, pg_dsn: str, pg: asyncpg.Connection
) -> None:
    """A failure that is neither an outage nor a refusal of the data (a trigger failing
    with feature_not_supported) is retried, narrowed down to its message, and that
    message dead-lettered whole with its identity; the messages fetched with it and
    everything after commit."""
    await _migrated(pg_dsn, nats_server)
    await pg.execute(
        "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.key = 'boom' THEN RAISE EXCEPTION 'boom' USING ERRCODE = "
        "'feature_not_supported'; END IF; RETURN NEW; END $$; "
        "CREATE TRIGGER boom BEFORE INSERT ON records FOR EACH ROW EXECUTE FUNCTION boom()")
    async with running_ingest(pg_dsn, nats_server.url, db_retry_max_s=0.05, fetch_batch=8):
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        try:
            await js.publish("es.rec.e1.s", encode_batch(batch("e1", "s", 1, good(3)))[0])
            boom = [GOOD, Record(GOOD.ts, CT_JSON, b"1", key="boom")]
            await js.publish("es.rec.e1.s", encode_batch(batch("e1", "s", 4, boom))[0])
            await js.publish("es.rec.e1.s", encode_batch(batch("e1", "s", 6, good(3)))[0])
        finally:
            await nc.close()
        progress = await until(lambda: _complete(pg, "e1", "s", 8), timeout=30)
        letter = await pg.fetchrow("SELECT kind, seq, last_seq, reason FROM dead_letters")
    assert (letter["kind"], letter["seq"], letter["last_seq"]) == ("batch", 4, 5)
    assert "boom" in letter["reason"]
    assert await _seqs(pg) == [1, 2, 3, 6, 7, 8]
    assert progress["dead_lettered_records"] == 2


async def _publish(nats_url: str, records: list[Record]) -> None:
    """One batch of ``records`` from edge e1, stream s, seqs from 1."""
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().publish("es.rec.e1.s",
                                     encode_batch(batch("e1", "s", 1, records))[0])
    finally:
        await nc.close()


async def _migrated(dsn: str, nats_server: EmbeddedNats) -> None:
    async with running_ingest(dsn, nats_server.url):
        pass


async def _complete(
    conn: asyncpg.Connection, edge: str, stream: str, watermark: int
) -> asyncpg.Record | None:
    row = await conn.fetchrow(
        "SELECT watermark, committed_records, dead_lettered_records, missing_records "
        "FROM v_completeness WHERE (edge_id, stream) = ($1, $2)", edge, stream)
    return row if row is not None and row["watermark"] >= watermark else None


async def _seqs(conn: asyncpg.Connection) -> list[int]:
    return [r[0] for r in await conn.fetch("SELECT seq FROM records ORDER BY seq")]
