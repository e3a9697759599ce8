"""Scenario 7: a fleet, thousands of small edges on one cloud (issue 12).

Two parts, in one run:

- **Fan-in drain.** The same ``fleet_drain_records`` records pre-loaded into
  ``ES_RECORDS``, on a fresh nats-server and database each time: (1) as one
  edge's shipper-sized batches (*bulk*, the single-edge figure of this run), and
  (2) as ``fleet_drain_edges`` edges x 2 streams x ``fleet_drain_batch``-record
  batches, interleaved as a fleet's linger-driven batches arrive (*fan-in*). An
  ingest process drains each, timed from its ``ingest_started`` log line until
  the feed counts them all inserted (``feed_commits``: one row per commit, a cheap
  poll; summing ``committed_ranges`` cost ~30 ms of PostgreSQL CPU per poll at
  4,000 keys). Bulk and fan-in run as ``fleet_drain_pairs`` back-to-back pairs in
  alternating order, and the ratio is the median of the pairs' (one pair's ratio
  moved 0.34-0.53x between runs on the shared 2-core machine); the fan-in once more
  with two ingest processes on the shared consumer (the CPU split says who used the
  cores).
- **Live fleet**, per size in ``fleet_sizes``: a real ingest and a real API
  process, and N simulated edges (:class:`bench.fleet_driver.Fleet`: real wire
  batches, heartbeats, watermark keys, one durable control consumer each) in the
  driver. Measured: the time and the nats-server memory to create the N control
  consumers; the commit-to-edge watermark latency while the fleet offers
  ``fleet_rate`` records/s in 10-record batches (from ``received_at``, which the
  ingest stamps as it starts writing a group, to the moment the simulated edge saw
  a watermark covering the batch: an upper bound of commit-to-edge); the cloud's
  CPU at idle (heartbeats every 5 s and the edges' control polls, nothing else)
  per edge per hour and the RSS of ingest, API and nats-server; ``GET /v1/edges``
  (a page, a filtered page, and all N in one request) and ``edgesync status``; and
  a command's delivery latency to one edge among N (POST to the edge's pull
  request answered).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final

import asyncpg
import httpx
from nats.js import JetStreamContext

from bench.data import Pool, batches
from bench.driving import inserted_records, wait_for
from bench.env import BenchEnv, connect_nats
from bench.fleet_driver import Fleet, fanin_batches
from bench.procs import CpuMeter, MeasuredService, ProcessCpu, memory_mib
from bench.profiles import Profile
from bench.results import ScenarioResult
from broker.pg_connecting import connected
from broker.protocol.commands import generate_key_pair
from broker.protocol.topology import Topology
from broker.protocol.wire import Batch, encode_batch, msg_id

__all__ = [
    "CLOUD",
    "KEY",
    "TITLE",
    "TOKEN",
    "preload",
    "run",
]

KEY: Final = "fleet"
TITLE: Final = "7. fleet"
TOKEN: Final = secrets.token_hex(32)
"""The API's operator token for this run: random, as the API refuses weak ones."""
CLOUD: Final = ("nats-server", "postgres", "ingest", "api")
"""The processes that make up the cloud's cost."""


async def run(env: BenchEnv, profile: Profile, pool: Pool,
              step: Callable[[str], None]) -> ScenarioResult:
    res = ScenarioResult(KEY, TITLE)
    await _drains(env, profile, pool, step, res)
    for n in profile.fleet_sizes:
        await _live(env, profile, pool, n=n, step=step, res=res)
    return res


# -- fan-in drain ----------------------------------------------------------------------------


async def _drains(env: BenchEnv, profile: Profile, pool: Pool, step: Callable[[str], None],
                  res: ScenarioResult) -> None:
    n = profile.fleet_drain_records
    edges, per = profile.fleet_drain_edges, profile.fleet_drain_batch
    step(f"encoding {n:,} records as bulk and as {edges:,} edges x 2 streams")
    bulk_batches = batches(pool, n)
    fan_batches = fanin_batches(pool, edges, n, per)
    pairs: list[tuple[float, float]] = []
    count = profile.fleet_drain_pairs
    for k in range(count):
        # Back to back, the order alternating (bulk first, then fan-in first, ...), so
        # that the machine's speed drifting through the run (it does, on shared cores)
        # favours neither side; each pair's ratio is of two neighbouring drains.
        suffix = f"-r{k + 1}" if k else ""
        of = f" ({k + 1} of {count})" if count > 1 else ""

        async def bulk_drain(suffix: str = suffix, of: str = of) -> float:
            step(f"bulk drain{of}: one edge's big batches")
            return await _drain(env, f"fleet-bulk{suffix}", bulk_batches, 1, res)

        async def fanin_drain(suffix: str = suffix, of: str = of) -> float:
            step(f"fan-in drain{of}: {len(fan_batches):,} batches of {per} records")
            return await _drain(env, f"fleet-fanin{suffix}", fan_batches, 1, res)

        if k % 2 == 0:
            bulk = await bulk_drain()
            fanin = await fanin_drain()
        else:
            fanin = await fanin_drain()
            bulk = await bulk_drain()
        pairs.append((bulk, fanin))
    step("fan-in drain with 2 ingest processes")
    fanin2 = await _drain(env, "fleet-fanin-2", fan_batches, 2, res)
    ratios = [f / b for b, f in pairs]
    ratio = statistics.median(ratios)
    bulk = statistics.median(b for b, _ in pairs)
    fanin = statistics.median(f for _, f in pairs)
    median = f", median of {count} drains" if count > 1 else ""
    res.add("fan-in ingest, 1 process", fanin, "rec/s",
            f"{n:,} records, {edges:,} edges x 2 streams, {per}-record batches: "
            f"{fanin / per:,.0f} batches/s{median}")
    res.add("bulk ingest, same records", bulk, "rec/s",
            f"one edge, {len(bulk_batches)} shipper batches of up to 2,000 records{median}")
    res.add("fan-in / bulk", ratio, "x",
            "" if count == 1 else
            f"median of {count} back-to-back pairs: " + " / ".join(f"{r:.2f}" for r in ratios))
    res.add("fan-in ingest, 2 processes", fanin2, "rec/s",
            "one durable consumer shared; CPU split below (fleet-fanin-2)")
    res.add("2 processes / 1 process", fanin2 / fanin, "x",
            f"{os.cpu_count()} cores shared by nats-server, PostgreSQL, the ingests, the driver")
    res.check("fan-in ingest (10-record batches)", "≥ 0.5 x bulk rate of the same run",
              f"{ratio:.2f}x", ratio >= 0.5)
    res.data.update(drain_records=n, drain_edges=edges, drain_batch=per, fanin_rps=fanin,
                    bulk_rps=bulk, fanin2_rps=fanin2, drain_pairs=pairs)


async def preload(js: JetStreamContext, topology: Topology, wire: Sequence[Batch]) -> None:
    """``wire`` into the records stream, as the edges publish it (``Nats-Msg-Id`` and all)."""
    acks = []
    for b in wire:
        body, headers = encode_batch(b)
        headers["Nats-Msg-Id"] = msg_id(b.edge, b.stream, b.epoch, b.first_seq, b.last_seq)
        acks.append(await js.publish_async(topology.records_subject(b.edge, b.stream), body,
                                           headers=headers))
    await asyncio.gather(*acks)


async def _drain(env: BenchEnv, name: str, wire: Sequence[Batch], processes: int,
                 res: ScenarioResult) -> float:
    n = sum(len(b.records) for b in wire)
    async with env.nats_server(name) as nats_server, env.database(name) as dsn:
        nc = await connect_nats(nats_server.url)
        try:
            js = nc.jetstream(timeout=30)
            topology = Topology()
            await topology.ensure_streams(js)
            await preload(js, topology, wire)
        finally:
            await nc.close()
        ingests = [env.ingest(f"{name}-{i}", nats_server.url, dsn) for i in range(processes)]
        async with connected(dsn) as conn:
            async with env.statement_times(dsn, res.data, name):
                await asyncio.gather(*(i.start() for i in ingests))
                meter = env.cpu_meter(nats_server, **{
                    f"ingest {i + 1}" if processes > 1 else "ingest": p
                    for i, p in enumerate(ingests)})
                meter.start()

                async def all_committed() -> bool:
                    return await inserted_records(conn) >= n

                done = await wait_for(all_committed, timeout=900, interval=0.02,
                                      what=f"{n} records committed")
                res.cpu_seconds[name] = {**meter.stop(), "wall": round(meter.wall_s, 2)}
            starts = [i.started_at("ingest_started") for i in ingests]
            assert None not in starts, "ingest_started not found in an ingest's log"
            rows = await conn.fetchval("SELECT count(*) FROM records")
            assert rows == n, f"exactly-once violated: {rows} rows for {n} records"
            await asyncio.gather(*(i.stop() for i in ingests))
    return n / (done - min(s for s in starts if s is not None))


# -- live fleet --------------------------------------------------------------------------------


def _api(env: BenchEnv, name: str, nats_url: str, dsn: str) -> MeasuredService:
    """An API process (not started) on a port it picks and reports."""
    keys = env.workdir / f"keys-{name}-{uuid.uuid4().hex[:6]}"
    private, _ = generate_key_pair(keys)
    return MeasuredService("api", {
        "EDGESYNC_API__POSTGRES_DSN": dsn,
        "EDGESYNC_API__PORT": "0",
        "EDGESYNC_API__PRIVATE_KEY_FILE": str(private),
        "EDGESYNC_API__OPERATOR_TOKEN": TOKEN,
        "EDGESYNC_NATS__URL": nats_url,
        # info: the start-up line that reports the port it bound is an info event.
        "EDGESYNC_LOG__LEVEL": "info",
        "EDGESYNC_LOG__FORMAT": "json",
        **env.service_env,
    }, log_file=env.workdir / f"api-{name}.log",
        profile_to=env.profile_file(f"api-{name}"), profile_gil=env.profile_gil)


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _live(env: BenchEnv, profile: Profile, pool: Pool, *, n: int,
                step: Callable[[str], None], res: ScenarioResult) -> None:
    label = f"{n:,} edges"
    name = f"fleet-{n}"
    async with env.nats_server(name) as nats_server, env.database(name) as dsn:
        assert nats_server.pid is not None
        ingest = env.ingest(name, nats_server.url, dsn)
        api = _api(env, name, nats_server.url, dsn)
        nc = await connect_nats(nats_server.url)
        conn = await asyncpg.connect(dsn)
        fleet: Fleet | None = None
        try:
            await ingest.start()  # creates the streams and the watermark bucket
            await api.start()
            js = nc.jetstream(timeout=60)
            fleet = Fleet(nc, js, Topology(), pool, n)

            step(f"{label}: creating {n:,} control consumers")
            before = memory_mib(nats_server.pid).get("rss", 0.0)
            create_s = await fleet.create_control_consumers()
            nats_growth = memory_mib(nats_server.pid).get("rss", 0.0) - before
            res.add(f"{label}: create control consumers", create_s, "s",
                    f"{n / create_s:,.0f} consumers/s, 32 concurrent requests")
            res.add(f"{label}: nats-server RSS growth for them", nats_growth, "MiB",
                    f"{nats_growth * 1024 / n:.1f} KiB per consumer (VmRSS before/after)")

            step(f"{label}: edges subscribe and report")
            await fleet.start()
            await fleet.heartbeat_all()

            async def all_known() -> bool:
                return int(await conn.fetchval("SELECT count(*) FROM edges")) >= n

            await wait_for(all_known, timeout=120, interval=0.2, what=f"{n} edges known")

            step(f"{label}: shipping {profile.fleet_rate:,.0f} rec/s for "
                 f"{profile.fleet_load_s:g} s")
            meter = _meter(env, nats_server, ingest, api)
            meter.start()
            shipped = await fleet.ship_paced(profile.fleet_rate, profile.fleet_load_s,
                                             profile.fleet_drain_batch)

            async def committed() -> bool:
                return await inserted_records(conn) >= shipped

            await wait_for(committed, timeout=300, interval=0.05,
                           what=f"{shipped} fleet records committed")

            async def seen() -> bool:
                return fleet is not None and fleet.pending() == 0

            await wait_for(seen, timeout=60, interval=0.05, what="every watermark seen")
            res.cpu_seconds[f"{name} load"] = {**meter.stop(), "wall": round(meter.wall_s, 2)}
            lat = await _watermark_latency(conn, fleet)
            p50, p99 = _pct(lat, 0.5), _pct(lat, 0.99)
            res.add(f"{label}: watermark latency p50", p50 * 1000, "ms",
                    f"{len(lat):,} batches; received_at (ingest starts the group) -> the "
                    "edge sees a covering watermark")
            res.add(f"{label}: watermark latency p99", p99 * 1000, "ms",
                    f"offered {profile.fleet_rate:,.0f} rec/s in "
                    f"{profile.fleet_drain_batch}-record batches, {shipped:,} records")
            if n == max(profile.fleet_sizes):
                res.check(f"watermark latency at {label}", "p99 ≤ 1 s", f"{p99 * 1000:.0f} ms",
                          p99 <= 1.0)

            step(f"{label}: idle (heartbeats every 5 s, control polls)")
            await asyncio.sleep(2.0)
            for svc in (ingest, api):
                svc.memory()
            meter = _meter(env, nats_server, ingest, api)
            meter.start()
            await asyncio.sleep(profile.fleet_idle_s)
            idle = meter.stop()
            res.cpu_seconds[f"{name} idle"] = {**idle, "wall": round(meter.wall_s, 2)}
            cloud = sum(v for k, v in idle.items() if k in CLOUD)
            per_edge_hour = cloud / n / meter.wall_s * 3600
            res.add(f"{label}: idle cloud CPU per edge per hour", per_edge_hour, "CPU s",
                    f"{cloud:.2f} CPU s in {meter.wall_s:.0f} s: "
                    + ", ".join(f"{k} {idle.get(k, 0):.2f}" for k in CLOUD)
                    + f"; driver {idle.get('bench driver', 0):.2f}")
            if n == max(profile.fleet_sizes):
                res.check(f"idle cloud cost at {label}", "≤ 1 CPU-second per edge per hour",
                          f"{per_edge_hour:.3f} CPU s", per_edge_hour <= 1.0)
            rss = {"ingest": ingest.memory().get("rss", 0.0), "api": api.memory().get("rss", 0.0),
                   "nats-server": memory_mib(nats_server.pid).get("rss", 0.0)}
            res.add(f"{label}: RSS ingest / API / nats-server", rss["ingest"], "MiB",
                    f"API {rss['api']:.1f} MiB, nats-server {rss['nats-server']:.1f} MiB "
                    "(VmRSS at idle)")

            step(f"{label}: GET /v1/edges and edgesync status")
            await _api_latency(api, n, dsn, label, res, check=n == max(profile.fleet_sizes))

            step(f"{label}: commands to single edges")
            await _command_latency(api, fleet, profile.fleet_commands, label, res,
                                   check=n == max(profile.fleet_sizes))
            res.data[name] = {"consumers_s": create_s, "nats_growth_mib": nats_growth,
                              "watermark_p50_s": p50, "watermark_p99_s": p99,
                              "idle": idle, "rss": rss, "kv_reads": fleet.kv_reads,
                              "heartbeats": fleet.heartbeats}
        finally:
            if fleet is not None:
                await fleet.stop()
            await conn.close()
            await nc.close()
            await api.stop()
            await ingest.stop()


def _meter(env: BenchEnv, nats_server: Any, ingest: MeasuredService,
           api: MeasuredService) -> CpuMeter:
    meter = env.cpu_meter(nats_server, ingest=ingest)
    meter.add("api", ProcessCpu(api.pid))
    return meter


async def _watermark_latency(conn: asyncpg.Connection, fleet: Fleet) -> list[float]:
    """Seconds from each batch's ``received_at`` to its watermark seen at the edge."""
    seen = fleet.watermark_latencies()
    rows = await conn.fetch(
        "SELECT extract(epoch FROM r.received_at)::float8 AS at, u.i "
        "FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[]) WITH ORDINALITY "
        "  AS u(edge_id, stream, epoch, seq, i) "
        "JOIN v_records r USING (edge_id, stream, epoch, seq)",
        [b.edge for b in seen], [b.stream for b in seen], [b.epoch for b in seen],
        [b.last_seq for b in seen])
    return [max(0.0, (seen[r["i"] - 1].seen or 0.0) - r["at"]) for r in rows]


async def _api_latency(api: MeasuredService, n: int, dsn: str, label: str,
                       res: ScenarioResult, *, check: bool) -> None:
    async with httpx.AsyncClient(base_url=api.url, trust_env=False, timeout=60,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        async def timed(path: str, reps: int) -> tuple[float, int]:
            times = []
            count = 0
            for _ in range(reps):
                t0 = time.perf_counter()
                answer = await client.get(path)
                times.append(time.perf_counter() - t0)
                answer.raise_for_status()
                count = len(answer.json())
            return statistics.median(times), count

        page, page_n = await timed("/v1/edges", 10)
        lagging, _ = await timed("/v1/edges?state=lagging", 10)
        whole, whole_n = await timed(f"/v1/edges?limit={min(10_000, n)}", 5)
    res.add(f"{label}: GET /v1/edges (a page)", page * 1000, "ms",
            f"median of 10; default page of {page_n:,} edges, keyset pagination")
    res.add(f"{label}: GET /v1/edges?state=lagging", lagging * 1000, "ms", "median of 10")
    res.add(f"{label}: GET /v1/edges, all in one page", whole * 1000, "ms",
            f"median of 5; {whole_n:,} edges")
    if check:
        res.check(f"GET /v1/edges at {label}", "≤ 200 ms (paginated, filterable)",
                  f"{page * 1000:.0f} ms a page; {whole * 1000:.0f} ms all {whole_n:,}",
                  page <= 0.2)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        proc = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "broker", "status", "--dsn", dsn],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "COLUMNS": "200"}, timeout=300, check=False)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise RuntimeError(f"edgesync status failed: {proc.stderr.decode()[-2000:]}")
    t0 = time.perf_counter()
    await asyncio.to_thread(subprocess.run, [sys.executable, "-c", "import broker.cli.main"],
                            check=True, timeout=120)
    startup = time.perf_counter() - t0
    res.add(f"{label}: edgesync status", statistics.median(times) * 1000, "ms",
            f"median of 3, whole CLI run incl. {startup * 1000:.0f} ms interpreter and "
            "import start-up; the fleet summary and the 50 rows that need attention "
            "(the default --limit)")


async def _command_latency(api: MeasuredService, fleet: Fleet, count: int, label: str,
                           res: ScenarioResult, *, check: bool) -> None:
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"kind": "bridge.configure", "spec": {"log_level": "info"}, "ttl_seconds": 600}
    step = max(1, len(fleet.edges) // count)
    async with httpx.AsyncClient(base_url=api.url, trust_env=False, timeout=30) as client:
        for k in range(count):
            edge = fleet.edges[(k * step + k) % len(fleet.edges)]
            before = len(fleet.commands.get(edge, []))
            t0 = time.time()
            answer = await client.post(f"/v1/edges/{edge}/commands", json=body, headers=headers)
            answer.raise_for_status()

            async def delivered(edge: str = edge, before: int = before) -> bool:
                return len(fleet.commands.get(edge, [])) > before

            await wait_for(delivered, timeout=30, interval=0.002, what=f"command to {edge}")
            latencies.append(fleet.commands[edge][-1] - t0)
            await asyncio.sleep(0.05)
    p50, p99 = _pct(latencies, 0.5), _pct(latencies, 0.99)
    res.add(f"{label}: command delivery p50", p50 * 1000, "ms",
            f"{count} commands to single edges: POST -> the edge's pull request answered")
    res.add(f"{label}: command delivery p99", p99 * 1000, "ms")
    if check:
        res.check(f"command to one edge of {label}", "p99 ≤ 1 s", f"{p99 * 1000:.0f} ms",
                  p99 <= 1.0)
