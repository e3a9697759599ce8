"""Scenario 5: footprint, the RSS of the bridge idle and under load, and of the ingest.

A fresh bridge process connects to NATS, settles for :data:`SETTLE_S`, and
idles (heartbeats only) for ``footprint_idle_s``; its ``VmRSS`` and ``VmHWM``
are read, and the CPU it used while idle, as a share of one core. Then an ingest
process starts and SDK producers push ``footprint_records`` at full speed
through the whole pipeline until PostgreSQL has them all; the peak RSS
(``VmHWM``) of both processes is read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

from bench.data import Pool
from bench.driving import produce, wait_committed
from bench.env import BenchEnv
from bench.procs import cpu_seconds
from bench.profiles import Profile
from bench.results import ScenarioResult

__all__ = ["KEY", "SETTLE_S", "TITLE", "run"]

KEY: Final = "footprint"
TITLE: Final = "5. footprint"
SETTLE_S: Final = 2.0
"""After start-up (imports, connecting, the first heartbeat) and before the idle
measurement begins."""


async def run(env: BenchEnv, profile: Profile, pool: Pool,
              step: Callable[[str], None]) -> ScenarioResult:
    res = ScenarioResult(KEY, TITLE)
    n = profile.footprint_records
    async with env.nats_server("footprint") as nats_server, env.database("footprint") as dsn:
        bridge = env.bridge("footprint", nats_server.url)
        ingest = env.ingest("footprint", nats_server.url, dsn)
        try:
            step("bridge idle")
            await bridge.start(need_nats=True)
            await asyncio.sleep(SETTLE_S)
            cpu_before, idle_from = cpu_seconds(bridge.pid), time.monotonic()
            await asyncio.sleep(profile.footprint_idle_s)
            idle_cpu_pct = 100 * (cpu_seconds(bridge.pid) - cpu_before) / (
                time.monotonic() - idle_from)
            idle = bridge.memory()
            step(f"full pipeline under load: {n:,} records")
            await ingest.start()
            meter = env.cpu_meter(nats_server, bridge=bridge, ingest=ingest)
            meter.start()
            produced = await produce(bridge.url, pool, n, profile.producers)
            await wait_committed(dsn, n, timeout=600)
            res.cpu_seconds["load"] = {**meter.stop(), "wall": round(meter.wall_s, 2)}
            loaded, ingest_mem = bridge.memory(), ingest.memory()
        finally:
            await bridge.stop()
            await ingest.stop()
    assert produced.failed == 0
    res.add("bridge RSS idle", idle.get("rss"), "MiB",
            f"VmRSS after {profile.footprint_idle_s:g} s connected and idle; "
            f"VmHWM {idle.get('peak', 0):.1f} MiB")
    res.add("bridge CPU idle", idle_cpu_pct, "% of a core",
            f"over {profile.footprint_idle_s:g} s connected and idle, after {SETTLE_S:g} s "
            "to settle (CPU time in 10 ms ticks)")
    res.add("bridge peak RSS under load", loaded.get("peak"), "MiB",
            f"VmHWM, {n:,} records through SDK -> bridge -> JetStream -> ingest")
    res.add("ingest peak RSS under load", ingest_mem.get("peak"), "MiB", "VmHWM")
    res.add("pipeline rate under this load", n / res.cpu_seconds["load"]["wall"], "rec/s",
            "publish start to all committed in PostgreSQL")
    res.check("bridge idle RSS", "≤ 55 MiB", f"{idle.get('rss', 0):.1f} MiB",
              idle.get("rss", 1e9) <= 55)
    res.check("bridge idle CPU", "≤ 0.5 % of a core", f"{idle_cpu_pct:.2f} %",
              idle_cpu_pct <= 0.5)
    res.data.update(bridge_idle_mib=idle, bridge_idle_cpu_pct=idle_cpu_pct,
                    bridge_load_mib=loaded, ingest_load_mib=ingest_mem, records=n)
    return res
