"""Scenario 2: the edge path, SDK -> bridge (durable) -> JetStream (acked).

- *edgesync*: ``producers`` tasks in the driver, each an SDK client publishing
  fire-and-forget with ``EdgeClient.send`` (no future per record), against one
  bridge running as its own process (default settings: SQLite
  ``synchronous=FULL``, batches of 2,000). Timed from the first record to the
  moment the bridge's ``edgesync_records_shipped_total`` reaches N (every
  record JetStream-acked); the time until every producer's ``flush`` returned
  (durable at the bridge) is shown too. The CPU the driver (the SDK producers)
  and the bridge used in that phase, per record, are figures of their own
  (the SDK's target row); so is the synchronous SDK: one application thread
  sending through a ``SyncEdgeClient.send`` to the same bridge, until
  ``flush`` returns. The same two are measured with ``publish`` and its
  future per record, beside them (not target rows).
- *floor* of the SDK's CPU per record: what any Python client must do per record
  (JSON encoding, event time, keeping it), beside ``EdgeClient.send`` with no I/O,
  both in the driver's thread with no bridge running
  (:mod:`bench.scenarios._sdk_floor`).
- *ceiling*: the durable append alone, the same records in the same chunks
  straight into a buffer file with the bridge's settings
  (:mod:`bench.scenarios._durable_append`); the edge path is shown as a ratio to it.
- *baselines*: an app publishing one JSON record per message straight to
  JetStream with ``Nats-Msg-Id`` (the equivalent guarantee): awaiting
  ``js.publish`` per record (one loop, the target's reference; and, for
  comparison, the same number of tasks as the SDK producers, each awaiting),
  and pipelining with nats-py's ``publish_async`` then awaiting every ack
  (``producers`` tasks, one connection).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Final

from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from bench.data import STREAM, Pool, json_message, json_msg_id
from bench.driving import produce, wait_shipped
from bench.env import BenchEnv, connect_nats, init_topology
from bench.procs import MeasuredService
from bench.profiles import Profile
from bench.results import ScenarioResult
from bench.scenarios._durable_append import REQUEST_RECORDS, durable_append
from bench.scenarios._sdk_floor import sdk_floor
from broker.runtime.embedded_nats import EmbeddedNats
from edge_bridge.sdk import BufferFull, SendFailed, SyncEdgeClient

__all__ = ["BASELINE_STREAM", "BASELINE_SUBJECT", "FLOOR_RECORDS", "KEY", "NO_RETRANSMIT",
           "TITLE", "run"]

KEY: Final = "edge_path"
TITLE: Final = "2. edge path SDK→bridge→JetStream"
BASELINE_STREAM: Final = "BENCH_EDGE"
BASELINE_SUBJECT: Final = "bench.edge.edge-1.telemetry"
FLOOR_RECORDS: Final = 200_000
"""Records the SDK's floor is timed on (fewer in the smoke profile)."""
NO_RETRANSMIT: Final = {"EDGESYNC_BRIDGE__SHIPPER__RETRANSMIT_TIMEOUT_S": "3600",
                         "EDGESYNC_BRIDGE__SHIPPER__MAX_UNCONFIRMED_BYTES": str(1 << 40)}
"""No ingest runs here, so nothing is ever committed: keep the bridge from re-shipping,
and from waiting for commits once its window of unconfirmed bytes (64 MiB by default)
is shipped: these scenarios measure the edge up to JetStream's acknowledgement."""


async def run(env: BenchEnv, profile: Profile, pool: Pool,
              step: Callable[[str], None]) -> ScenarioResult:
    res = ScenarioResult(KEY, TITLE)
    n = profile.edge_records
    p = profile.producers
    async with env.nats_server("edge") as nats_server:
        await init_topology(nats_server.url)
        bridge = env.bridge("edge", nats_server.url, buffer_max_bytes=4 * 1024**3,
                            extra=NO_RETRANSMIT)
        await bridge.start(need_nats=True)
        try:
            warm = 2_000
            step("warming up the bridge")
            await produce(bridge.url, pool, warm, 1)
            await wait_shipped(bridge.url, warm, timeout=60)
            step(f"edgesync: {p} SDK producers, {n:,} records")
            meter = env.cpu_meter(nats_server, bridge=bridge)
            meter.start()
            main_thread = time.thread_time()
            started = time.time()
            result = await produce(bridge.url, pool, n, p)
            shipped_at = await wait_shipped(bridge.url, warm + n, timeout=900)
            res.cpu_seconds["edgesync"] = {**meter.stop(), "wall": round(meter.wall_s, 2)}
            main_thread = time.thread_time() - main_thread
            memory = bridge.memory()
            # The target rows first (send), at the bridge state main's bench measured
            # them in; then the same with publish and its future per record.
            sync_runs: dict[bool, tuple[float, int]] = {}
            sync_runs[False] = await _sync_phase(env, nats_server, bridge, res, pool=pool,
                                                 n=profile.sync_records, futures=False, step=step)
            step(f"edgesync with publish (a future per record): {p} producers, {n:,} records")
            meter = env.cpu_meter(nats_server, bridge=bridge)
            meter.start()
            futures_result = await produce(bridge.url, pool, n, p, futures=True)
            await wait_shipped(bridge.url, warm + 2 * n + profile.sync_records, timeout=900)
            res.cpu_seconds["edgesync, publish"] = {**meter.stop(),
                                                    "wall": round(meter.wall_s, 2)}
            sync_runs[True] = await _sync_phase(env, nats_server, bridge, res, pool=pool,
                                                n=profile.sync_records, futures=True, step=step)
        finally:
            await bridge.stop()
        assert result.failed == 0, f"{result.failed} records failed at the SDK"
        assert futures_result.failed == 0, f"{futures_result.failed} records failed at publish"
        (sync_seconds, sync_failed), (sync_f_seconds, sync_f_failed) = (
            sync_runs[False], sync_runs[True])
        assert sync_failed + sync_f_failed == 0, "records failed at the synchronous SDK"
        durable_rps = n / result.seconds
        shipped_rps = n / (shipped_at - started)
        sync_rps = profile.sync_records / sync_seconds
        sync_f_rps = profile.sync_records / sync_f_seconds
        cpu = res.cpu_seconds["edgesync"]
        sdk_us = cpu.get("bench driver", 0.0) / n * 1e6
        bridge_us = cpu.get("bridge", 0.0) / n * 1e6
        sdk_main_us = main_thread / n * 1e6
        sdk_f_us = res.cpu_seconds["edgesync, publish"].get("bench driver", 0.0) / n * 1e6
        floor_n = min(n, FLOOR_RECORDS)
        step(f"floor: the SDK's per-record work alone, {floor_n:,} records")
        floor = await sdk_floor(pool, floor_n)
        step(f"ceiling: durable append of the same chunks, {n:,} records")
        ceiling = await durable_append(env.workdir / "append-ceiling", pool, n)
        ceiling_rps = ceiling.rps

        nc = await connect_nats(nats_server.url)
        try:
            js = nc.jetstream(timeout=10)
            await js.add_stream(StreamConfig(
                name=BASELINE_STREAM, subjects=["bench.edge.>"], storage=StorageType.FILE,
                duplicate_window=300.0,
            ))
            step(f"baseline: awaited js.publish per record, {profile.publish_wait_records:,}")
            meter = env.cpu_meter(nats_server)
            meter.start()
            wait_rps = await _publish_each(js, pool, profile.publish_wait_records, 1, 1)
            res.cpu_seconds["awaited publish"] = {**meter.stop(), "wall": round(meter.wall_s, 2)}
            step(f"baseline: {p} tasks each awaiting js.publish per record")
            wait_p_rps = await _publish_each(js, pool, profile.publish_wait_records, p,
                                             1 + profile.publish_wait_records)
            step(f"baseline: publish_async pipelined, {profile.publish_async_records:,}")
            meter = env.cpu_meter(nats_server)
            meter.start()
            async_rps = await _publish_async(js, pool, profile.publish_async_records, p,
                                             1 + 2 * profile.publish_wait_records)
            res.cpu_seconds["publish_async"] = {**meter.stop(), "wall": round(meter.wall_s, 2)}
        finally:
            await nc.close()

    res.add("edgesync, JetStream-acked", shipped_rps, "rec/s",
            f"{n:,} records, {p} producers, bridge as its own process")
    res.add("edgesync, durable at the bridge", durable_rps, "rec/s",
            "until every producer's flush returned")
    res.add("ceiling: durable append alone", ceiling_rps, "rec/s",
            f"the same records as {REQUEST_RECORDS:,}-record chunks into SQLite with the "
            "bridge's settings (WAL, synchronous=FULL), one fsynced commit each")
    res.add("edgesync / durable-append ceiling", shipped_rps / ceiling_rps, "x")
    res.add("SDK CPU per record", sdk_us, "µs",
            f"the driver's CPU ({p} producers, send) in the edgesync phase / records")
    res.add("SDK CPU per record, main thread", sdk_main_us, "µs",
            "the same phase, the driver's main thread only (the producers, their HTTP, "
            "the bench's polls; not the bench's progress display)")
    res.add("floor: JSON + event time + keep, per record", floor.floor_us, "µs",
            f"what any Python client does per dict record, {floor_n:,} records, no bridge "
            f"running (median of 3; JSON encoding alone {floor.encode_us:.2f} µs)")
    res.add("EdgeClient.send without I/O, per record", floor.send_us, "µs",
            "the same records, the same conditions, sending left out of the timed loop")
    res.add("SDK CPU per record, publish", sdk_f_us, "µs",
            f"the same with publish and a future per record ({p} producers)")
    res.add("bridge CPU per record", bridge_us, "µs",
            "the bridge process's CPU in the edgesync phase / records")
    res.add("floor: durable append CPU per record", ceiling.cpu_us, "µs",
            "the ceiling's appending thread: SQLite's work for the same chunks, which every "
            "acknowledged record costs the bridge (no HTTP, validation or shipping)")
    res.add("synchronous SDK, one thread", sync_rps, "rec/s",
            f"{profile.sync_records:,} records with send, then flush; same bridge")
    res.add("synchronous SDK, one thread, publish", sync_f_rps, "rec/s",
            f"{profile.sync_records:,} records with publish (a future each), then flush")
    res.add("baseline: awaited js.publish per record", wait_rps, "rec/s",
            f"{profile.publish_wait_records:,} JSON records, one loop")
    res.add(f"baseline: {p} tasks each awaiting js.publish", wait_p_rps, "rec/s",
            f"{profile.publish_wait_records:,} JSON records")
    res.add("baseline: js.publish_async pipelined", async_rps, "rec/s",
            f"{profile.publish_async_records:,} JSON records, {p} tasks")
    ratio = shipped_rps / wait_rps
    res.add("edgesync / awaited publish", ratio, "x")
    res.add(f"edgesync / {p} awaiting tasks", shipped_rps / wait_p_rps, "x")
    res.add("edgesync / publish_async", shipped_rps / async_rps, "x")
    res.add("bridge peak RSS under this load", memory.get("peak"), "MiB", "VmHWM")
    res.check("edge path, durable", "≥ 300,000 records/s", f"{shipped_rps:,.0f} rec/s",
              shipped_rps >= 300_000, f"{shipped_rps / ceiling_rps:.2f}x the durable-append "
              f"ceiling ({ceiling_rps:,.0f} rec/s)")
    res.check("SDK CPU per record", "≤ 2.5 µs", f"{sdk_us:.2f} µs", sdk_us <= 2.5,
              f"floor {floor.floor_us:.2f} µs, send without I/O {floor.send_us:.2f} µs")
    res.check("bridge CPU per record", "≤ 2.5 µs", f"{bridge_us:.2f} µs", bridge_us <= 2.5,
              f"the durable append alone {ceiling.cpu_us:.2f} µs")
    res.check("synchronous SDK", "≥ 150,000 records/s", f"{sync_rps:,.0f} rec/s",
              sync_rps >= 150_000)
    res.check("edge path, durable", "≥ 20 x per-record awaited publish", f"{ratio:.1f}x",
              ratio >= 20)
    res.data.update(records=n, producers=p, shipped_rps=shipped_rps, durable_rps=durable_rps,
                    awaited_publish_rps=wait_rps, awaited_publish_tasks_rps=wait_p_rps,
                    publish_async_rps=async_rps, ceiling_rps=ceiling_rps,
                    sdk_cpu_us_per_record=sdk_us, bridge_cpu_us_per_record=bridge_us,
                    sdk_main_thread_cpu_us_per_record=sdk_main_us,
                    sdk_floor_us_per_record=floor.floor_us, sdk_send_no_io_us=floor.send_us,
                    json_encode_us_per_record=floor.encode_us,
                    durable_append_cpu_us_per_record=ceiling.cpu_us,
                    sdk_publish_cpu_us_per_record=sdk_f_us, sync_publish_rps=sync_f_rps,
                    sync_rps=sync_rps, bridge_memory_mib=memory)
    return res


async def _publish_each(js: JetStreamContext, pool: Pool, n: int, tasks: int,
                        first_seq: int) -> float:
    records = list(pool.records(n))

    async def one(offset: int) -> None:
        for i in range(offset, n, tasks):
            seq = first_seq + i
            await js.publish(BASELINE_SUBJECT, json_message(records[i], seq),
                             headers={"Nats-Msg-Id": json_msg_id(seq)})

    started = time.perf_counter()
    await asyncio.gather(*(one(t) for t in range(tasks)))
    return n / (time.perf_counter() - started)


async def _publish_async(js: JetStreamContext, pool: Pool, n: int, tasks: int,
                         first_seq: int) -> float:
    records = list(pool.records(n))

    async def one(offset: int) -> None:
        acks = []
        for i in range(offset, n, tasks):
            seq = first_seq + i
            acks.append(await js.publish_async(
                BASELINE_SUBJECT, json_message(records[i], seq),
                headers={"Nats-Msg-Id": json_msg_id(seq)},
            ))
        await asyncio.gather(*acks)

    started = time.perf_counter()
    await asyncio.gather(*(one(t) for t in range(tasks)))
    return n / (time.perf_counter() - started)


async def _sync_phase(env: BenchEnv, nats_server: EmbeddedNats, bridge: MeasuredService,
                      res: ScenarioResult, *, pool: Pool, n: int, futures: bool,
                      step: Callable[[str], None]) -> tuple[float, int]:
    """One application thread through the synchronous SDK, metered."""
    how = "publish, a future per record" if futures else "send"
    step(f"synchronous SDK ({how}): one thread, {n:,} records")
    meter = env.cpu_meter(nats_server, bridge=bridge)
    meter.start()
    outcome = await asyncio.to_thread(_sync_produce, bridge.url, pool, n, futures=futures)
    res.cpu_seconds["sync SDK, publish" if futures else "sync SDK"] = {
        **meter.stop(), "wall": round(meter.wall_s, 2)}
    return outcome


def _sync_produce(url: str, pool: Pool, n: int, *, futures: bool) -> tuple[float, int]:
    """One application thread sending ``n`` records through a ``SyncEdgeClient``
    (``send``, or ``publish`` with a future each if ``futures``); returns the
    seconds until ``flush`` returned, and the records that failed. Back-pressure
    (``BufferFull``: the SDK's ``max_pending_records`` are unconfirmed) is waited out
    as the async producers wait it out (``bench.driving``)."""
    assert threading.current_thread() is not threading.main_thread()
    size = len(pool)
    client = SyncEdgeClient(url)
    publish = client.publish if futures else client.send
    started = time.perf_counter()
    try:
        with client:
            started = time.perf_counter()
            i = 0
            while i < n:
                j = i % size
                try:
                    publish(STREAM, pool.dicts[j], key=pool.keys[j])
                except BufferFull:  # max_pending_records unconfirmed: wait, as an app must
                    time.sleep(0.002)
                    continue
                i += 1
            client.flush()
            seconds = time.perf_counter() - started
    except SendFailed:  # counted in stats
        seconds = time.perf_counter() - started
    return seconds, client.stats.records_failed
