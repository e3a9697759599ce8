"""End-to-end acknowledgement: the edge keeps each record until PostgreSQL has it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import nats

from broker.pg_connecting import connected
from broker.protocol.topology import Topology
from broker.protocol.wire import CT_JSON, Batch, Record, encode_batch, msg_id
from broker.runtime.embedded_nats import EmbeddedNats
from broker.settings import ShipperSettings, StreamPolicy
from cloud_ingest.ranges import merge_ranges
from cloud_ingest.schema import migrate
from cloud_ingest.writing import GroupWriter
from edge_bridge.bridge import Bridge
from edge_bridge.sdk import EdgeClient
from tests.helpers import until
from tests.integration.harness import (
    bridge_settings,
    count_records,
    running_bridge,
    running_ingest,
    wait_for_records,
)

_NOW_US = time.time_ns() // 1000
"""``received_at`` of the rows these tests write (today: its partition exists)."""


async def publish(url: str, stream: str, n: int, *, start: int = 0, pad: str = "",
                  batch: int = 1000) -> None:
    async with EdgeClient(url, linger_ms=1, batch_max_records=batch) as client:
        futures = [client.publish(stream, {"id": i, "pad": pad}) for i in range(start, start + n)]
        await client.flush()
        for f in futures:
            f.result()


async def all_shipped(bridge: Bridge, stream: str, n: int) -> bool:
    state = bridge.buffer.stream_state(stream)
    return state is not None and state.shipped_seq >= n


async def buffered(bridge: Bridge) -> int:
    return (await bridge.buffer.stats()).records


async def metric(bridge: Bridge, name: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{bridge.url}/metrics")).text
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not exposed")


async def test_only_committed_records_leave_the_edge(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """Shipped (JetStream-acked) records stay in the buffer until the ingest commits
    them; then the committed watermark lets the bridge delete them."""
    async with running_bridge(bridge_settings(tmp_path), nats_server.url) as bridge:
        await publish(bridge.url, "s", 1_000)
        await until(lambda: all_shipped(bridge, "s", 1_000), timeout=15)
        assert await metric(bridge, "edgesync_buffer_unshipped_records") == 0
        assert await metric(bridge, "edgesync_buffer_records") == 1_000  # kept: not committed
        async with running_ingest(pg_dsn, nats_server.url):
            await wait_for_records(pg_dsn, 1_000)
            await until(lambda: metric_is(bridge, "edgesync_buffer_records", 0), timeout=15,
                        message="committed records stayed in the edge buffer")


async def metric_is(bridge: Bridge, name: str, value: float) -> bool:
    return await metric(bridge, name) == value


async def test_records_lost_after_the_jetstream_ack_are_shipped_again(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """JetStream acked the batches, then the stream was purged before any ingest ran:
    the bridge retransmits after its timeout and Postgres ends with each record once."""
    settings = bridge_settings(tmp_path, shipper=ShipperSettings(
        linger_ms=1, retransmit_timeout_s=1.0, batch_max_records=500))
    async with running_bridge(settings, nats_server.url) as bridge:
        await publish(bridge.url, "s", 3_000)
        await until(lambda: all_shipped(bridge, "s", 3_000), timeout=15)
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await js.purge_stream("ES_RECORDS")
            assert (await js.stream_info("ES_RECORDS")).state.messages == 0
        finally:
            await nc.close()
        async with running_ingest(pg_dsn, nats_server.url):
            await wait_for_records(pg_dsn, 3_000, timeout=60)
            await until(lambda: buffered_is(bridge, 0), timeout=15)
        assert await metric(bridge, "edgesync_retransmissions_total") >= 1
    async with connected(pg_dsn) as conn:
        ids = await conn.fetchval("SELECT count(DISTINCT payload->>'id') FROM records")
    assert ids == 3_000


async def buffered_is(bridge: Bridge, n: int) -> bool:
    return await buffered(bridge) == n


async def _blocking_pids(conn: asyncpg.Connection, pid: int) -> list[int]:
    """The backends whose locks backend ``pid`` is waiting for (empty: not waiting)."""
    return list(await conn.fetchval("SELECT pg_blocking_pids($1)", pid))


def _batch(first: int, n: int) -> Batch:
    return Batch(1, "e1", "s", 5, first, [Record(i, CT_JSON, b"{}") for i in range(n)])


async def test_out_of_order_commits_give_the_contiguous_watermark(pg_dsn: str) -> None:
    """Two writers: seqs 101-200 commit before 1-100. The watermark is 0 after the first
    commit (a gap below it) and 200 after the second."""
    setup = await asyncpg.connect(pg_dsn)
    await migrate(setup)
    await setup.close()
    writer = GroupWriter(Topology())
    a = await asyncpg.connect(pg_dsn)
    b = await asyncpg.connect(pg_dsn)
    watcher = await asyncpg.connect(pg_dsn)
    try:
        from cloud_ingest.ingesting import init_connection

        await init_connection(a)
        await init_connection(b)
        tx_a = a.transaction()
        await tx_a.start()
        await writer._insert(a, GroupWriter.rows(_batch(101, 100), _NOW_US))
        marks_a = await merge_ranges(a, "ranges", [("e1", "s", 5, 101, 200)])
        # B starts while A holds its row lock, and must wait for A's commit.
        async def write_b() -> list[tuple[str, str, int, int]]:
            async with b.transaction():
                await writer._insert(b, GroupWriter.rows(_batch(1, 100), _NOW_US))
                return await merge_ranges(b, "ranges", [("e1", "s", 5, 1, 100)])

        task_b = asyncio.create_task(write_b())
        # Serialised on the committed_ranges row: B's backend waits for a lock A holds.
        a_pid, b_pid = a.get_server_pid(), b.get_server_pid()
        blockers = await until(lambda: _blocking_pids(watcher, b_pid), timeout=10,
                               message="B never waited on a lock")
        assert blockers == [a_pid]
        assert not task_b.done()
        await tx_a.commit()
        marks_b = await asyncio.wait_for(task_b, 10)
    finally:
        await a.close()
        await b.close()
        await watcher.close()
    assert marks_a == [("e1", "s", 5, 0)]
    assert marks_b == [("e1", "s", 5, 200)]


async def test_two_ingest_processes_on_one_consumer_reach_the_full_watermark(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """Batches published newest first, consumed by two ingests: the published
    watermark ends at the last seq, with every record once."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await Topology().ensure_streams(js)
    n_batches, size = 60, 50
    for k in reversed(range(n_batches)):
        first = k * size + 1
        body, headers = encode_batch(_batch(first, size))
        headers["Nats-Msg-Id"] = msg_id("e1", "s", 5, first, first + size - 1)
        await js.publish("es.rec.e1.s", body, headers=headers)
    try:
        async with running_ingest(pg_dsn, nats_server.url, fetch_batch=4), \
                running_ingest(pg_dsn, nats_server.url, fetch_batch=4):
            await wait_for_records(pg_dsn, n_batches * size)
            kv = await js.key_value("ES_WATERMARKS")

            async def published_watermark() -> bool:
                entry = await kv.get("e1.s.5")
                return entry.value == str(n_batches * size).encode()

            await until(published_watermark, timeout=10)
    finally:
        await nc.close()
    async with connected(pg_dsn) as conn:
        row = await conn.fetchrow("SELECT * FROM v_stream_progress")
    assert row["committed_watermark"] == row["committed_records"] == n_batches * size


async def completeness(dsn: str) -> asyncpg.Record:
    async with connected(dsn) as conn:
        return await conn.fetchrow("SELECT * FROM v_completeness")


async def test_drop_oldest_markers_explain_every_missing_record(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """Overflow drops reach the cloud as drop markers whose counts equal the records
    missing in Postgres; the completeness view shows no unexplained gap."""
    await nats_server.stop()
    settings = bridge_settings(tmp_path, buffer_max_bytes=64 * 1024,
                               default_policy=StreamPolicy(overflow="drop_oldest"))
    sent = 600
    async with running_bridge(settings, nats_server.url) as bridge:
        await publish(bridge.url, "s", sent, pad="x" * 400, batch=20)
        dropped = (await bridge.buffer.stats()).dropped["s"]["overflow"]
        assert dropped > 0
        await nats_server.restart()
        async with running_ingest(pg_dsn, nats_server.url):
            await wait_for_records(pg_dsn, sent - dropped, timeout=60)

            async def accounted() -> asyncpg.Record | None:
                row = await completeness(pg_dsn)
                return row if row and row["watermark"] == sent else None

            row = await until(accounted, timeout=20, message="watermark never passed the drops")
            await until(lambda: buffered_is(bridge, 0), timeout=15)
    assert row["dropped_overflow"] == row["dropped_records"] == dropped
    assert row["missing_records"] == 0
    assert row["committed_records"] + dropped == sent
    assert await count_records(pg_dsn) == sent - dropped
    shown = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "broker", "status", "--gaps", "--dsn", pg_dsn],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"},
    )
    assert shown.returncode == 0, shown.stderr
    assert f"{dropped:,} ({dropped:,}/0)" in shown.stdout  # dropped (overflow/ttl)
    assert f"{sent - dropped:,}" in shown.stdout


async def test_ttl_expired_records_are_never_shipped_and_are_accounted_for(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """Records older than the stream's TTL are dropped during an outage (freeing their
    space), counted, reported as ttl drops, and never reach Postgres."""
    await nats_server.stop()
    # The 50 fresh records must reach PostgreSQL within the TTL: 3 s, not 1, so that a
    # loaded machine (a benchmark beside the tests) does not expire them on the way.
    settings = bridge_settings(tmp_path, streams={"fresh": StreamPolicy(ttl_s=3.0)})
    async with running_bridge(settings, nats_server.url) as bridge:
        await publish(bridge.url, "fresh", 200)
        await until(lambda: buffered_is(bridge, 0), timeout=10, message="nothing expired")
        assert (await bridge.buffer.stats()).dropped["fresh"] == {"overflow": 0, "ttl": 200}
        await nats_server.restart()
        async with running_ingest(pg_dsn, nats_server.url):
            await until(lambda: bridge.nats_connected, timeout=15)
            await publish(bridge.url, "fresh", 50, start=200)  # fresh ones still flow
            await wait_for_records(pg_dsn, 50)

            async def accounted() -> asyncpg.Record | None:
                row = await completeness(pg_dsn)
                return row if row and row["watermark"] == 250 else None

            row = await until(accounted, timeout=20)
    assert row["dropped_ttl"] == 200 and row["missing_records"] == 0
    assert row["committed_records"] == 50


async def test_a_high_priority_stream_overtakes_a_low_priority_backlog(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """With a backlog in both, the high-priority stream is committed before the
    low-priority backlog has drained."""
    await nats_server.stop()
    settings = bridge_settings(tmp_path, streams={
        "bulk": StreamPolicy(priority=0), "alarms": StreamPolicy(priority=10),
    }, shipper=ShipperSettings(linger_ms=1, max_in_flight=2, batch_max_records=1000))
    async with running_bridge(settings, nats_server.url) as bridge:
        await publish(bridge.url, "bulk", 40_000)
        await publish(bridge.url, "alarms", 500)
        await nats_server.restart()
        # One worker, one batch per transaction: commit order is stream order.
        async with running_ingest(pg_dsn, nats_server.url, workers=1, fetch_batch=1,
                                  group_max_messages=1):
            await wait_for_records(pg_dsn, 40_500, timeout=90)
    async with connected(pg_dsn) as conn:
        alarms_done = await conn.fetchval(
            "SELECT max(received_at) FROM v_records WHERE stream = 'alarms'")
        bulk_before = await conn.fetchval(
            "SELECT count(*) FROM v_records WHERE stream = 'bulk' AND received_at <= $1",
            alarms_done)
    # At most the batches that were in flight when the link came back go first.
    assert bulk_before <= 2 * 1000, f"{bulk_before} bulk records committed before the alarms"


async def test_zstd_batches_are_ingested_identically(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """The same records through a plain and a zstd bridge give identical rows; the
    ratio of bytes on the wire is printed for the record."""
    import random

    from broker.cli.local_run import synthetic_telemetry

    plain = bridge_settings(tmp_path, "plain")
    packed = bridge_settings(tmp_path, "packed", shipper=ShipperSettings(
        linger_ms=1, compression="zstd"))
    n = 5_000
    async with running_ingest(pg_dsn, nats_server.url), \
            running_bridge(plain, nats_server.url) as a, \
            running_bridge(packed, nats_server.url) as b:
        for bridge in (a, b):
            rng = random.Random(7)
            async with EdgeClient(bridge.url, linger_ms=1) as client:
                for i in range(n):
                    client.publish("t", synthetic_telemetry(rng, i), key=f"k{i % 13}",
                                   ts=1_767_225_600 + i)
        await wait_for_records(pg_dsn, 2 * n)
        bytes_plain = await metric(a, "edgesync_bytes_shipped_total")
        bytes_zstd = await metric(b, "edgesync_bytes_shipped_total")
    async with connected(pg_dsn) as conn:
        diff = await conn.fetchval(
            "SELECT count(*) FROM (SELECT seq, event_time, key, payload FROM v_records "
            "WHERE edge_id = 'plain' EXCEPT SELECT seq, event_time, key, payload FROM v_records "
            "WHERE edge_id = 'packed') d")
    assert diff == 0
    assert bytes_zstd < bytes_plain
    print(f"\nbytes on the wire per record: plain {bytes_plain / n:.1f}, "
          f"zstd {bytes_zstd / n:.1f} (ratio {bytes_zstd / bytes_plain:.3f})")
