"""A malformed event is dead-lettered alone: the valid events fetched with it are
stored (issue 10, section 1, "Events")."""

from __future__ import annotations

import time

import asyncpg
import nats

from broker.protocol.events import CommandStatusReport, Heartbeat, encode_event
from broker.runtime.embedded_nats import EmbeddedNats
from tests.helpers import until
from tests.integration.harness import running_ingest


def heartbeat(edge: str, version: str = "1.0", sent_at: float | None = None) -> Heartbeat:
    return Heartbeat(edge=edge, version=version, sent_at=sent_at or time.time(),
                     buffer_records=0, buffer_bytes=0, buffer_max_bytes=1,
                     unshipped_records=0, oldest_unshipped_age_s=0.0, disk_bytes=0,
                     dropped={})


async def test_a_heartbeat_postgres_refuses_is_dead_lettered_alone(
    nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """In one fetched group: two good heartbeats, one whose version holds NUL (text
    refuses it), one from year 300,000 (timestamptz refuses it), and a status
    report. The refused two become 'event' dead letters; the rest is stored."""
    async with running_ingest(pg_dsn, nats_server.url):
        pass  # streams, consumers and schema exist; the group below waits for the next run
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        await js.publish("es.evt.a", encode_event(heartbeat("a")))
        await js.publish("es.evt.b", encode_event(heartbeat("b", version="1.0\x00")))
        await js.publish("es.evt.c", encode_event(heartbeat("c", sent_at=1e13)))
        await js.publish("es.evt.d", encode_event(heartbeat("d")))
        await js.publish("es.evt.a", encode_event(CommandStatusReport(
            edge="a", command_id="00000000-0000-0000-0000-000000000000", digest="x",
            status="applied", reported_at=time.time())))
    finally:
        await nc.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        async with running_ingest(pg_dsn, nats_server.url):
            async def stored() -> bool:
                return int(await conn.fetchval("SELECT count(*) FROM edges")) >= 2 and int(
                    await conn.fetchval("SELECT count(*) FROM dead_letters")) >= 2

            await until(stored, timeout=15)
        edges = [r[0] for r in await conn.fetch("SELECT edge_id FROM edges ORDER BY 1")]
        letters = await conn.fetch("SELECT kind, subject, reason FROM dead_letters ORDER BY id")
        reports = int(await conn.fetchval("SELECT count(*) FROM command_events"))
    finally:
        await conn.close()
    assert edges == ["a", "d"]
    assert sorted((r["kind"], r["subject"]) for r in letters) == [
        ("event", "es.evt.b"), ("event", "es.evt.c")]
    assert all("rejected by PostgreSQL" in r["reason"] for r in letters)
    assert reports == 1


async def test_a_trim_floor_beyond_int8_is_dead_lettered_and_other_edges_reconcile(
    nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """An edge (buggy or hostile) reporting a trim floor at the top of int8 cannot stop
    the reconciliation of other edges: its heartbeat is dead-lettered alone, and a
    well-behaved edge's floor in the same group is still reconciled."""
    from broker.protocol.events import StreamHealth

    def beat(edge: str, floor: int) -> Heartbeat:
        health = StreamHealth(epoch=7, next_seq=floor + 1 if floor < 2**63 - 1 else floor,
                              shipped_seq=floor, committed_seq=floor, records=0, bytes=0,
                              dropped_overflow=0, dropped_ttl=0, oldest_uncommitted_age_s=0.0,
                              trim_floor=floor)
        return Heartbeat(edge=edge, version="1.0", sent_at=time.time(), buffer_records=0,
                         buffer_bytes=0, buffer_max_bytes=1, unshipped_records=0,
                         oldest_unshipped_age_s=0.0, disk_bytes=0, dropped={},
                         streams={"s": health})

    async with running_ingest(pg_dsn, nats_server.url):
        pass  # streams, consumers and schema exist; the group below waits for the next run
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.publish("es.evt.liar", encode_event(beat("liar", 2**63 - 1)))
        await js.publish("es.evt.good", encode_event(beat("good", 5)))
    finally:
        await nc.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        async with running_ingest(pg_dsn, nats_server.url):
            async def reconciled() -> bool:
                lost = await conn.fetchval(
                    "SELECT lost_after_commit_records FROM v_completeness "
                    "WHERE edge_id = 'good'")
                letters = int(await conn.fetchval("SELECT count(*) FROM dead_letters"))
                return lost == 5 and letters >= 1

            await until(reconciled, timeout=15)
        letters = await conn.fetch("SELECT kind, subject FROM dead_letters")
        edges = [r[0] for r in await conn.fetch("SELECT edge_id FROM edges ORDER BY 1")]
    finally:
        await conn.close()
    assert [(r["kind"], r["subject"]) for r in letters] == [("event", "es.evt.liar")]
    assert edges == ["good"]
