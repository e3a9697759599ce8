"""Scenario 3: end-to-end latency at a steady rate, SDK -> ... -> PostgreSQL row.

One SDK client offers ``latency_rate`` records/s (event time = the publish
call's wall time, which the SDK stamps) to a bridge process; an ingest
process writes them to PostgreSQL. Both clocks are this machine's.

Two figures bracket the true latency from publish call to committed row:

- *lower bound*: ``received_at - event_time`` from PostgreSQL; the ingest
  stamps ``received_at`` when it starts writing the record's group, just
  before COPY and COMMIT;
- *upper bound*: the driver polls the committed watermark every 10 ms and
  takes, for each record, the first poll that saw it committed; this adds
  up to one poll interval and counts a record only once every record before
  it in its stream is committed too.

Records of the warm-up are left out.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import Callable
from typing import Final

import asyncpg

from bench.data import Pool
from bench.driving import produce_paced, wait_committed
from bench.env import BenchEnv
from bench.profiles import Profile
from bench.results import ScenarioResult

__all__ = ["KEY", "POLL_S", "TITLE", "quantiles", "run"]

KEY: Final = "latency"
TITLE: Final = "3. end-to-end latency"
POLL_S: Final = 0.01


def quantiles(values: list[float], qs: tuple[float, ...]) -> list[float]:
    """Nearest-rank quantiles of ``values`` (sorted here)."""
    ordered = sorted(values)
    if not ordered:
        return [float("nan") for _ in qs]
    return [ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] for q in qs]


async def run(env: BenchEnv, profile: Profile, pool: Pool,
              step: Callable[[str], None]) -> ScenarioResult:
    res = ScenarioResult(KEY, TITLE)
    rate = profile.latency_rate
    total_s = profile.latency_warmup_s + profile.latency_seconds
    warm = int(rate * profile.latency_warmup_s)
    total = int(rate * total_s)
    async with env.nats_server("latency") as nats_server, env.database("latency") as dsn:
        ingest = env.ingest("latency", nats_server.url, dsn)
        bridge = env.bridge("latency", nats_server.url)
        conn = await asyncpg.connect(dsn)
        watcher: asyncio.Task[None] | None = None
        try:
            await ingest.start()
            await bridge.start(need_nats=True)
            watermarks: list[tuple[float, int]] = []
            watcher = asyncio.create_task(_watch(conn, watermarks))
            step(f"offering {rate:,.0f} records/s for {total_s:.0f} s")
            meter = env.cpu_meter(nats_server, bridge=bridge, ingest=ingest)
            meter.start()
            offered = await produce_paced(bridge.url, pool, rate, total_s)
            await wait_committed(dsn, total, timeout=120)
            res.cpu_seconds["steady load"] = {**meter.stop(), "wall": round(meter.wall_s, 2)}
            await _cancel(watcher)
            bridge_mem, ingest_mem = bridge.memory(), ingest.memory()
            rows = await conn.fetch(
                "SELECT seq, (extract(epoch FROM event_time) * 1e6)::int8 AS ev, "
                "(extract(epoch FROM received_at) * 1e6)::int8 AS rx FROM records "
                "WHERE seq > $1 ORDER BY seq", warm,
            )
        finally:
            await _cancel(watcher)
            await conn.close()
            await bridge.stop()
            await ingest.stop()
    assert offered.failed == 0
    assert len(rows) == total - warm, f"{len(rows)} rows for {total - warm} measured records"
    lower = [(r["rx"] - r["ev"]) / 1000 for r in rows]
    times = [t for t, _ in watermarks]
    marks = [w for _, w in watermarks]
    upper = []
    for r in rows:
        i = bisect.bisect_left(marks, r["seq"])
        if i < len(times):
            upper.append(times[i] * 1000 - r["ev"] / 1000)
    lo = quantiles(lower, (0.5, 0.95, 0.99))
    hi = quantiles(upper, (0.5, 0.95, 0.99))
    achieved = total / offered.publish_seconds
    pushback = (f"; the SDK pushed back {offered.pushed_back:,} times (max_pending_records "
                "unconfirmed): the pipeline did not keep up") if offered.pushed_back else ""
    res.add("offered rate", achieved, "rec/s",
            f"{total - warm:,} measured records after a {profile.latency_warmup_s:g} s "
            f"warm-up{pushback}")
    for name, lo_v, hi_v in zip(("p50", "p95", "p99"), lo, hi, strict=True):
        res.add(f"latency {name}", hi_v, "ms",
                f"upper bound (committed watermark seen); lower bound {lo_v:.1f} ms "
                "(received_at - event time)")
    res.add("bridge RSS at steady load", bridge_mem.get("peak"), "MiB", "VmHWM")
    res.add("ingest RSS at steady load", ingest_mem.get("peak"), "MiB", "VmHWM")
    res.check("end-to-end latency at 10k records/s", "p50 ≤ 50 ms",
              f"{hi[0]:.1f} ms (lower bound {lo[0]:.1f})", hi[0] <= 50,
              "" if rate == 10_000 else f"measured at {rate:,.0f} records/s")
    res.check("end-to-end latency at 10k records/s", "p99 ≤ 250 ms",
              f"{hi[2]:.1f} ms (lower bound {lo[2]:.1f})", hi[2] <= 250,
              "" if rate == 10_000 else f"measured at {rate:,.0f} records/s")
    res.data.update(rate=rate, achieved_rate=achieved, measured_records=total - warm,
                    pushed_back=offered.pushed_back,
                    lower_ms=dict(zip(("p50", "p95", "p99"), lo, strict=True)),
                    upper_ms=dict(zip(("p50", "p95", "p99"), hi, strict=True)),
                    bridge_memory_mib=bridge_mem, ingest_memory_mib=ingest_mem)
    return res


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task  # a watcher that already failed: its error is not the story


async def _watch(conn: asyncpg.Connection, out: list[tuple[float, int]]) -> None:
    """Record (wall time, committed watermark) whenever the watermark moves."""
    last = -1
    while True:
        mark = await conn.fetchval(
            "SELECT coalesce(max(es_watermark(ranges + dropped)), 0) FROM committed_ranges"
        )
        if mark != last:
            out.append((time.time(), int(mark)))
            last = int(mark)
        await asyncio.sleep(POLL_S)
