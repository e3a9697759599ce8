"""Scenario 4: backlog drain and the bridge's memory while it drains.

For each backlog size: a fresh bridge process connects to a fresh
nats-server; NATS is stopped; SDK producers fill the bridge's buffer with the
backlog (durable, NATS down); the bridge's peak RSS is read and reset
(``/proc/<pid>/clear_refs``); NATS is started again on the same port and
store, and the drain is timed until the bridge has shipped every record
(JetStream-acked).

The drain rate is measured from the first shipment seen after NATS came
back; the time from NATS back to the first shipment (reconnect plus the
shipper's publish-retry backoff, capped at ``retry_backoff_max_s``) is shown
on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from bench.data import Pool
from bench.driving import produce, wait_shipped
from bench.env import BenchEnv, init_topology
from bench.procs import reset_peak
from bench.profiles import Profile
from bench.results import ScenarioResult
from bench.scenarios.edge_path import NO_RETRANSMIT

__all__ = ["KEY", "TITLE", "run"]

KEY: Final = "backlog"
TITLE: Final = "4. backlog drain and memory"


async def run(env: BenchEnv, profile: Profile, pool: Pool,
              step: Callable[[str], None]) -> ScenarioResult:
    res = ScenarioResult(KEY, TITLE)
    runs: list[dict[str, Any]] = []
    for size in profile.backlog_sizes:
        runs.append(await _one(env, profile, pool, size, step=step, res=res))
    for r in runs:
        size = r["records"]
        res.add(f"drain {size:,}", r["drain_rps"], "rec/s",
                f"{r['drain_s']:.1f} s from first shipment; {r['first_ship_s']:.1f} s from "
                "NATS back to first shipment")
        res.add(f"bridge peak RSS draining {size:,}", r["drain_peak_mib"], "MiB",
                f"VmHWM reset before NATS came back; while filling: {r['fill_peak_mib']:.1f} MiB")
        res.add(f"fill {size:,} with NATS down", r["fill_rps"], "rec/s",
                "SDK -> bridge durable, nothing shipping")
    small, big = runs
    growth = (big["drain_peak_mib"] - small["drain_peak_mib"]) / small["drain_peak_mib"] * 100
    res.add("peak RSS growth, small -> big backlog", growth, "%")
    worst = min(r["drain_rps"] for r in runs)
    peak = max(r["drain_peak_mib"] for r in runs)
    res.check("backlog drain", "≥ 100,000 records/s", f"{worst:,.0f} rec/s (slower of two)",
              worst >= 100_000)
    res.check("backlog drain", "bridge peak RSS ≤ 150 MiB", f"{peak:.1f} MiB", peak <= 150)
    res.check("backlog drain", "peak RSS within 10 % between backlogs",
              f"{growth:+.1f} % ({small['records']:,} -> {big['records']:,})", abs(growth) <= 10)
    res.data["runs"] = runs
    return res


async def _one(env: BenchEnv, profile: Profile, pool: Pool, size: int, *,
               step: Callable[[str], None], res: ScenarioResult) -> dict[str, Any]:
    async with env.nats_server(f"backlog-{size}") as nats_server:
        await init_topology(nats_server.url)  # no ingest here to create the streams
        bridge = env.bridge(f"backlog-{size}", nats_server.url,
                            buffer_max_bytes=4 * 1024**3, extra=NO_RETRANSMIT)
        await bridge.start(need_nats=True)
        try:
            step(f"{size:,}: stopping NATS")
            await nats_server.stop()
            await bridge.wait_nats_connected(False)
            step(f"{size:,}: filling the buffer through the SDK")
            filled = await produce(bridge.url, pool, size, profile.producers)
            assert filled.failed == 0, f"{filled.failed} records failed at the SDK"
            fill_mem = bridge.memory()
            reset_peak(bridge.pid)
            step(f"{size:,}: NATS back, draining")
            meter = env.cpu_meter(None, bridge=bridge)
            meter.start()
            back = time.time()
            await nats_server.start()
            meter.add("nats-server", _nats_cpu(nats_server), started_within=True)
            first: list[tuple[float, float]] = []
            done = await wait_shipped(bridge.url, size, timeout=900, interval=0.02,
                                      first_seen=first)
            res.cpu_seconds[f"drain {size:,}"] = {**meter.stop(), "wall": round(meter.wall_s, 2)}
            drain_mem = bridge.memory()
        finally:
            await bridge.stop()
    # Rate over what shipped after the first poll that saw a shipment: the
    # batches that were in flight when NATS came back land at once.
    first_at, first_count = first[0] if first else (back, 0.0)
    return {
        "records": size,
        "fill_rps": size / filled.seconds,
        "fill_peak_mib": fill_mem.get("peak", 0.0),
        "fill_rss_mib": fill_mem.get("rss", 0.0),
        "drain_peak_mib": drain_mem.get("peak", 0.0),
        "drain_rss_mib": drain_mem.get("rss", 0.0),
        "first_ship_s": first_at - back,
        "drain_s": done - first_at,
        "drain_rps": (
            (size - first_count) / max(done - first_at, 1e-6) if first_count < size
            else size / max(done - back, 1e-6)  # a backlog that landed in one poll
        ),
        "shipped_at_first_poll": first_count,
        "nats_back_to_drained_s": done - back,
    }


def _nats_cpu(nats_server: Any) -> Any:
    from bench.procs import ProcessCpu

    return ProcessCpu(nats_server.pid)
