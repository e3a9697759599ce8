"""A trickle of events (a small fleet's heartbeats) is written a few groups per second,
not one transaction per event: after a fetch that came back short, the events consumer
lingers (``cloud_ingest.events_consuming.LINGER_S``) so the next group gathers more. The
events of one transaction share its ``now()``, which is each edge's ``last_seen``."""

from __future__ import annotations

import asyncio
import time

import nats

from broker.pg_connecting import connected
from broker.protocol.events import Heartbeat, encode_event
from broker.protocol.topology import Topology
from broker.runtime.embedded_nats import EmbeddedNats
from cloud_ingest.events_consuming import LINGER_S
from tests.helpers import until
from tests.integration.harness import running_ingest

EDGES = 20
SPACING_S = 0.01
"""The trickle: one heartbeat every 10 ms, 20 in ~0.2 s (LINGER_S is 0.25 s)."""


def _beat(edge: str) -> bytes:
    return encode_event(Heartbeat(
        edge=edge, version="1.0", sent_at=time.time(), buffer_records=0, buffer_bytes=0,
        buffer_max_bytes=1, unshipped_records=0, oldest_unshipped_age_s=0.0, disk_bytes=0,
        dropped={}))


async def test_a_trickle_of_heartbeats_is_written_in_a_few_transactions(
    nats_server: EmbeddedNats, pg_dsn: str,
) -> None:
    assert EDGES * SPACING_S <= LINGER_S
    topology = Topology()
    async with running_ingest(pg_dsn, nats_server.url), connected(pg_dsn) as conn:
        nc = await nats.connect(nats_server.url)
        try:
            for i in range(EDGES):
                await nc.publish(topology.events_subject(f"e{i}"), _beat(f"e{i}"))
                await nc.flush()
                await asyncio.sleep(SPACING_S)  # pacing the producer, not waiting on a result
        finally:
            await nc.close()

        async def all_seen() -> bool:
            return int(await conn.fetchval("SELECT count(*) FROM edges")) == EDGES

        await until(all_seen, timeout=15)
        transactions = await conn.fetchval("SELECT count(DISTINCT last_seen) FROM edges")
    # One transaction per heartbeat (or two) without the linger; with it, the ~0.2 s
    # trickle fits in the first short fetch and one or two lingered groups after it.
    assert transactions <= 4, f"{transactions} transactions for {EDGES} heartbeats"

