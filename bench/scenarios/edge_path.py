"""Scenario 2: the edge path, SDK -> bridge (durable) -> JetStream (acked).

- *edgesync*: ``producers`` tasks in the driver, each an SDK client publishing
  fire-and-forget, against one bridge running as its own process (default
  settings: SQLite ``synchronous=FULL``, batches of 2,000). Timed from the
  first publish to the moment the bridge's ``edgesync_records_shipped_total``
  reaches N (every record JetStream-acked); the time until every SDK future
  resolved (durable at the bridge) is shown too.
- *baselines*: an app publishing one JSON record per message straight to
  JetStream with ``Nats-Msg-Id`` (the equivalent guarantee): awaiting
  ``js.publish`` per record (one loop, the target's reference; and, for
  comparison, the same number of tasks as the SDK producers, each awaiting),
  and pipelining with nats-py's ``publish_async`` then awaiting every ack
  (``producers`` tasks, one connection).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from bench.data import Pool, json_message, json_msg_id
from bench.driving import produce, wait_shipped
from bench.env import BenchEnv, connect_nats, init_topology
from bench.profiles import Profile
from bench.results import ScenarioResult

__all__ = ["BASELINE_STREAM", "BASELINE_SUBJECT", "KEY", "NO_RETRANSMIT", "TITLE", "run"]

KEY: Final = "edge_path"
TITLE: Final = "2. edge path SDK→bridge→JetStream"
BASELINE_STREAM: Final = "BENCH_EDGE"
BASELINE_SUBJECT: Final = "bench.edge.edge-1.telemetry"
NO_RETRANSMIT: Final = {"EDGESYNC_BRIDGE__SHIPPER__RETRANSMIT_TIMEOUT_S": "3600"}
"""No ingest runs here, so nothing is ever committed: keep the bridge from re-shipping."""


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
            started = time.time()
            result = await produce(bridge.url, pool, n, p)
            shipped_at = await wait_shipped(bridge.url, warm + n, timeout=900)
            res.cpu_seconds["edgesync"] = {**meter.stop(), "wall": round(meter.wall_s, 2)}
            memory = bridge.memory()
        finally:
            await bridge.stop()
        assert result.failed == 0, f"{result.failed} records failed at the SDK"
        durable_rps = n / result.seconds
        shipped_rps = n / (shipped_at - started)

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
            "until every SDK future resolved")
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
    res.check("edge path, durable", "≥ 150,000 records/s", f"{shipped_rps:,.0f} rec/s",
              shipped_rps >= 150_000)
    res.check("edge path, durable", "≥ 20 x per-record awaited publish", f"{ratio:.1f}x",
              ratio >= 20)
    res.data.update(records=n, producers=p, shipped_rps=shipped_rps, durable_rps=durable_rps,
                    awaited_publish_rps=wait_rps, awaited_publish_tasks_rps=wait_p_rps,
                    publish_async_rps=async_rps,
                    bridge_memory_mib=memory)
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
