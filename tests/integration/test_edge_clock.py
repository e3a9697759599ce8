"""An edge's clock orders its reports (JetStream may hand an older heartbeat over after a
newer one), but one report from a clock gone wrong (a bad RTC at boot, spoofed NTP, far
in the future or ``inf``) must not freeze what the cloud shows of that edge: a heartbeat
is always a sign of life at once, an edge clock is stored at most a minute ahead of the
cloud's (so what a right clock reports wins again within a minute), and a stored time
further ahead never wins."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from broker.pg_connecting import connected
from broker.protocol.events import DesiredStateReport, Heartbeat, encode_event
from broker.protocol.topology import Topology
from broker.runtime.embedded_nats import EmbeddedNats
from tests.integration.control_harness import ControlPlane, control_plane
from tests.support.waiting import until

TOPOLOGY = Topology()


@pytest.fixture
async def plane(tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
                ) -> AsyncIterator[ControlPlane]:
    async with control_plane(tmp_path, nats_server.url, pg_dsn) as the_plane:
        yield the_plane


@pytest.fixture
async def js(nats_server: EmbeddedNats) -> AsyncIterator[nats.js.JetStreamContext]:
    nc = await nats.connect(nats_server.url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


def beat(edge: str, sent_at: float, buffer_records: int = 0) -> bytes:
    return encode_event(Heartbeat(
        edge=edge, version="x", sent_at=sent_at, buffer_records=buffer_records,
        buffer_bytes=0, buffer_max_bytes=1, unshipped_records=0, oldest_unshipped_age_s=0.0,
        disk_bytes=0, dropped={}))


async def edge_row(dsn: str, edge: str) -> dict[str, object]:
    async with connected(dsn) as conn:
        row = await conn.fetchrow(
            "SELECT last_seen > now() - interval '10 seconds' AS fresh, buffer_records,"
            " edge_clock <= now() + interval '1 minute' AS clock_bounded"
            " FROM edges WHERE edge_id = $1", edge)
    return {} if row is None else dict(row)


@pytest.mark.parametrize("wrong_clock", [4e10, float("inf")])
async def test_after_a_heartbeat_from_a_clock_gone_wrong_the_edge_stays_alive(
    plane: ControlPlane, js: nats.js.JetStreamContext, wrong_clock: float,
) -> None:
    edge = "clocky"
    await js.publish(TOPOLOGY.events_subject(edge), beat(edge, time.time(), 1))
    await plane.wait_edge(edge)
    await js.publish(TOPOLOGY.events_subject(edge), beat(edge, wrong_clock, 2))
    await until(lambda: _buffer_records_is(plane.pg_dsn, edge, 2), timeout=10)
    assert (await edge_row(plane.pg_dsn, edge))["clock_bounded"] is True
    async with connected(plane.pg_dsn) as conn:  # as if the edge were silent a while
        await conn.execute("UPDATE edges SET last_seen = now() - interval '1 hour'"
                           " WHERE edge_id = $1", edge)
    # The clock is right again: its heartbeats keep the edge alive at once.
    await js.publish(TOPOLOGY.events_subject(edge), beat(edge, time.time(), 3))
    await until(lambda: _fresh(plane.pg_dsn, edge), timeout=10,
                message="a right heartbeat after a wrong one did not count as a sign of life")
    online = {e["edge"]: e["online"] for e in (await plane.http.get("/v1/edges")).json()}
    assert online[edge] is True


async def test_a_stored_clock_beyond_the_skew_never_wins(
    plane: ControlPlane, js: nats.js.JetStreamContext,
) -> None:
    """A row holding a time far ahead (written before the bound existed) is replaced by
    the next heartbeat, and by the next desired-state report."""
    edge = "clocky"
    await js.publish(TOPOLOGY.events_subject(edge), beat(edge, time.time(), 1))
    await plane.wait_edge(edge)
    async with connected(plane.pg_dsn) as conn:
        await conn.execute("UPDATE edges SET edge_clock = 'infinity' WHERE edge_id = $1", edge)
    await js.publish(TOPOLOGY.events_subject(edge), beat(edge, time.time(), 5))
    await until(lambda: _buffer_records_is(plane.pg_dsn, edge, 5), timeout=10,
                message="the heartbeat lost to a stored clock at infinity")

    def report(status: str, at: float) -> bytes:
        return encode_event(DesiredStateReport(edge=edge, revision=0, version_id=0,
                                               digest="", status=status, reported_at=at))

    await js.publish(TOPOLOGY.events_subject(edge), report("failed", 4e10))
    await until(lambda: _reported(plane, edge, "failed"), timeout=10)
    async with connected(plane.pg_dsn) as conn:
        await conn.execute("UPDATE edge_reported_state SET reported_at = 'infinity'"
                           " WHERE edge_id = $1", edge)
    await js.publish(TOPOLOGY.events_subject(edge), report("healthy", time.time()))
    await until(lambda: _reported(plane, edge, "healthy"), timeout=10,
                message="the report lost to a stored clock at infinity")


async def _buffer_records_is(dsn: str, edge: str, n: int) -> bool:
    return (await edge_row(dsn, edge)).get("buffer_records") == n


async def _fresh(dsn: str, edge: str) -> bool:
    return (await edge_row(dsn, edge)).get("fresh") is True


async def _reported(plane: ControlPlane, edge: str, status: str) -> bool:
    view = (await plane.http.get(f"/v1/desired/edges/{edge}")).json()
    return view.get("reported_status") == status
