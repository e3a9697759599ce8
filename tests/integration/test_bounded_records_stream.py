"""The records stream is bounded by design: what it discards, the edge ships again."""

from __future__ import annotations

from pathlib import Path

import nats

from broker.pg_connecting import connected
from broker.protocol.topology import Topology
from broker.runtime.embedded_nats import EmbeddedNats
from broker.settings import IngestSettings, NatsSettings, ShipperSettings
from cloud_ingest.service import Ingest
from edge_bridge.bridge import Bridge
from tests.helpers import until
from tests.integration.harness import bridge_settings, running_bridge, serving, wait_for_records
from tests.integration.test_end_to_end_ack import (
    all_shipped,
    buffered_is,
    metric,
    publish,
)

_STREAM_BYTES = 48 * 1024
"""Far below the backlog (3,000 records of ~130 bytes): most batches are discarded."""


async def test_a_records_stream_smaller_than_the_backlog_still_commits_every_record_once(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """ES_RECORDS holds 48 KiB; 3,000 acknowledged records are shipped while no ingest
    runs, so JetStream discards the oldest batches before anyone read them. The edge
    retransmits what the cloud never committed, and PostgreSQL ends with every record
    exactly once."""
    nats_settings = NatsSettings(url=nats_server.url, records_max_bytes=_STREAM_BYTES)
    settings = bridge_settings(tmp_path, shipper=ShipperSettings(
        linger_ms=1, retransmit_timeout_s=1.0, retransmit_backoff_max_s=2.0,
        batch_max_records=100))
    async with running_bridge(settings, nats_server.url) as bridge:
        # The bridge still creates missing streams with the defaults: let it finish, then
        # the cloud sizes the stream from its settings, as the ingest does at start.
        await until(lambda: _attached(bridge), timeout=15)
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await Topology(records_max_bytes=nats_settings.records_max_bytes).ensure_streams(js)
            await publish(bridge.url, "s", 3_000, pad="x" * 100, batch=100)
            await until(lambda: all_shipped(bridge, "s", 3_000), timeout=30)
            state = (await js.stream_info("ES_RECORDS")).state
            assert state.bytes <= _STREAM_BYTES
            assert state.first_seq > 1, "nothing was discarded: the backlog fit the stream"
        finally:
            await nc.close()
        ingest = Ingest(IngestSettings(postgres_dsn=pg_dsn, port=0, db_retry_max_s=0.5),
                        nats_settings)
        async with serving(ingest):
            await wait_for_records(pg_dsn, 3_000, timeout=90)
            await until(lambda: buffered_is(bridge, 0), timeout=30,
                        message="committed records stayed in the edge buffer")
        assert await metric(bridge, "edgesync_retransmissions_total") >= 1
    async with connected(pg_dsn) as conn:
        rows = await conn.fetchval("SELECT count(*) FROM records")
        ids = await conn.fetchval("SELECT count(DISTINCT payload->>'id') FROM records")
    assert rows == ids == 3_000


async def _attached(bridge: Bridge) -> bool:
    """The bridge is past its own stream set-up (its watermark follower exists)."""
    return bridge.watermarks is not None
