"""A malformed event is dead-lettered alone: the valid events fetched with it are
stored (issue 10, section 1, "Events")."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import nats

from broker.pg_connecting import connected
from broker.protocol.events import CommandStatusReport, Event, Heartbeat, encode_event
from broker.runtime.embedded_nats import EmbeddedNats
from tests.helpers import until
from tests.integration.harness import running_ingest


def heartbeat(edge: str, version: str = "1.0", sent_at: float | None = None) -> Heartbeat:
    return Heartbeat(edge=edge, version=version, sent_at=sent_at or time.time(),
                     buffer_records=0, buffer_bytes=0, buffer_max_bytes=1,
                     unshipped_records=0, oldest_unshipped_age_s=0.0, disk_bytes=0,
                     dropped={})


@contextlib.asynccontextmanager
async def ingested_as_one_group(
    nats_url: str, pg_dsn: str, events: list[tuple[str, Event]],
    settled: Callable[[asyncpg.Connection], Awaitable[bool]],
) -> AsyncIterator[asyncpg.Connection]:
    """Publish ``events`` while no ingest runs (a first run creates the streams,
    consumers and schema), so that the next run fetches them as one group; yield a
    connection once ``settled(conn)`` held and that run stopped."""
    async with running_ingest(pg_dsn, nats_url):
        pass  # streams, consumers and schema exist; the group below waits for the next run
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for subject, event in events:
            await js.publish(subject, encode_event(event))
    finally:
        await nc.close()
    async with connected(pg_dsn) as conn:
        async def holds() -> bool:
            return await settled(conn)

        async with running_ingest(pg_dsn, nats_url):
            await until(holds, timeout=15)
        yield conn


async def test_a_heartbeat_postgres_refuses_is_dead_lettered_alone(
    nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """In one fetched group: two good heartbeats, one whose version holds NUL (text
    refuses it), one from year 300,000 (timestamptz refuses it), and a status
    report. The refused two become 'event' dead letters; the rest is stored."""
    async def stored(conn: asyncpg.Connection) -> bool:
        return int(await conn.fetchval("SELECT count(*) FROM edges")) >= 2 and int(
            await conn.fetchval("SELECT count(*) FROM dead_letters")) >= 2

    async with ingested_as_one_group(nats_server.url, pg_dsn, [
        ("es.evt.a", heartbeat("a")),
        ("es.evt.b", heartbeat("b", version="1.0\x00")),
        ("es.evt.c", heartbeat("c", sent_at=1e13)),
        ("es.evt.d", heartbeat("d")),
        ("es.evt.a", CommandStatusReport(
            edge="a", command_id="00000000-0000-0000-0000-000000000000", digest="x",
            status="applied", reported_at=time.time())),
    ], stored) as conn:
        edges = [r[0] for r in await conn.fetch("SELECT edge_id FROM edges ORDER BY 1")]
        letters = await conn.fetch("SELECT kind, subject, reason FROM dead_letters ORDER BY id")
        reports = int(await conn.fetchval("SELECT count(*) FROM command_events"))
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

    async def reconciled(conn: asyncpg.Connection) -> bool:
        lost = await conn.fetchval(
            "SELECT lost_after_commit_records FROM v_completeness "
            "WHERE edge_id = 'good'")
        letters = int(await conn.fetchval("SELECT count(*) FROM dead_letters"))
        return lost == 5 and letters >= 1

    async with ingested_as_one_group(nats_server.url, pg_dsn, [
        ("es.evt.liar", beat("liar", 2**63 - 1)), ("es.evt.good", beat("good", 5)),
    ], reconciled) as conn:
        letters = await conn.fetch("SELECT kind, subject FROM dead_letters")
        edges = [r[0] for r in await conn.fetch("SELECT edge_id FROM edges ORDER BY 1")]
    assert [(r["kind"], r["subject"]) for r in letters] == [("event", "es.evt.liar")]
    assert edges == ["good"]
