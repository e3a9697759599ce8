"""Scenario 9: the operator console (issue 16) at a fleet of 10,000 edges.

A fresh database gets ``console_edges`` rows in ``edges`` (a tenth offline, a
twentieth lagging, some with drops) and two streams each in ``committed_ranges``
(one edge in fifty with a gap), as heartbeats and the ingest would leave them. A
real API (the ``Api`` service, in the driver's process, against a fresh
nats-server and that database) serves the console; the driver logs in through the
login form and then:

- **Fleet page, server time**: ``GET /ui/fleet`` for several views (first page,
  sorted by backlog and by drops, a search, lagging only, with gaps, page 100),
  ``console_requests`` times each after a warm-up. Measured on the client (the
  whole HTTP exchange, session check included) and by the page's own
  ``Server-Timing`` (the handler: queries and rendering).
- **First paint**: where Debian's Chromium and Playwright are installed, the fleet
  page loaded ``console_paints`` times in a fresh browser context each (no cache),
  the browser's own ``first-contentful-paint``. Without them: skipped, with a note.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import httpx

from bench.data import Pool
from bench.env import BenchEnv, init_topology
from bench.profiles import Profile
from bench.results import ScenarioResult
from broker.pg_connecting import connected
from broker.protocol.commands import generate_key_pair
from broker.settings import ApiSettings, NatsSettings

__all__ = ["CHROMIUM", "KEY", "TITLE", "TOKEN", "VIEWS", "run"]

KEY: Final = "console"
TITLE: Final = "9. console"
CHROMIUM: Final = Path("/usr/bin/chromium")
TOKEN: Final = secrets.token_hex(32)
"""The API's bootstrap token for this run (random: the API refuses weak ones)."""

VIEWS: Final[tuple[tuple[str, dict[str, str]], ...]] = (
    ("first page, by edge id", {}),
    ("sorted by backlog, descending", {"sort": "backlog", "order": "desc"}),
    ("sorted by drops, descending", {"sort": "drops", "order": "desc"}),
    ("search `edge-0999`", {"q": "edge-0999"}),
    ("lagging only", {"state": "lagging"}),
    ("with gaps only", {"state": "gaps"}),
    ("page 100", {"page": "100"}),
)
"""The fleet views timed: each a ``GET /ui/fleet`` with these parameters."""

_FLEET_SQL: Final = """
INSERT INTO edges (edge_id, last_seen, version, buffer_records, buffer_bytes, buffer_max_bytes,
                   unshipped_records, oldest_unshipped_age_s, disk_bytes, dropped, streams,
                   edge_clock)
SELECT format('edge-%s', lpad(i::text, 5, '0')),
       now() - make_interval(secs => CASE WHEN i % 10 = 0 THEN 3600 ELSE i % 5 END),
       CASE WHEN i % 3 = 0 THEN '0.1.0' ELSE '0.2.0' END,
       (i * 37) % 5000, ((i * 37) % 5000) * 200, 256 * 1024 * 1024,
       (i * 13) % 400, CASE WHEN i % 20 = 1 THEN 120 ELSE i % 7 END, 4 * 1024 * 1024 + i,
       CASE WHEN i % 25 = 0 THEN jsonb_build_object('telemetry',
            jsonb_build_object('overflow', i % 100)) ELSE '{}'::jsonb END,
       jsonb_build_object('telemetry', jsonb_build_object('epoch', i),
                          'logs', jsonb_build_object('epoch', i)),
       now()
FROM generate_series(1, $1) AS i
"""

_RANGES_SQL: Final = """
INSERT INTO committed_ranges (edge_id, stream, epoch, ranges)
SELECT format('edge-%s', lpad(i::text, 5, '0')), s, i,
       CASE WHEN i % 50 = 0 AND s = 'telemetry'
            THEN int8multirange(int8range(1, 1000), int8range(1010, 5000))
            ELSE int8multirange(int8range(1, 5000)) END
FROM generate_series(1, $1) AS i, unnest(ARRAY['telemetry', 'logs']) AS s
"""

_TOTAL = re.compile(r"total;dur=([0-9.]+)")


async def run(env: BenchEnv, profile: Profile, pool: Pool,
              step: Callable[[str], None]) -> ScenarioResult:
    from cloud_ingest.api import Api

    res = ScenarioResult(KEY, TITLE)
    n = profile.console_edges
    keys = env.workdir / f"console-keys-{secrets.token_hex(3)}"
    private_key, _ = generate_key_pair(keys, "console")
    async with env.database("console") as dsn, env.nats_server("console") as nats_server:
        step(f"inserting {n:,} edges and {2 * n:,} stream ranges")
        async with connected(dsn) as conn:
            await conn.execute(_FLEET_SQL, n)
            await conn.execute(_RANGES_SQL, n)
            await conn.execute("ANALYZE edges; ANALYZE committed_ranges")
        await init_topology(nats_server.url)
        settings = ApiSettings(postgres_dsn=dsn, port=0, private_key_file=private_key,
                               operator_token=TOKEN)
        async with Api(settings, NatsSettings(url=nats_server.url)) as api:
            stop, ready = asyncio.Event(), asyncio.Event()
            serving = asyncio.create_task(api.serve(stop, ready), name="console-api")
            await ready.wait()
            try:
                cookie = await _login(api.url)
                await _fleet_pages(api.url, cookie, n, profile, step=step, res=res)
                await _first_paint(api.url, cookie, n, profile, step=step, res=res)
            finally:
                stop.set()
                await serving
    _ = pool
    return res


async def _login(url: str) -> str:
    async with httpx.AsyncClient(base_url=url) as client:
        answer = await client.post("/ui/login", data={"token": TOKEN, "next": "/ui/fleet"})
        if answer.status_code != 303:
            raise RuntimeError(f"console login refused: {answer.status_code} {answer.text}")
        return str(answer.cookies["edgesync_console"])


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


async def _fleet_pages(url: str, cookie: str, n: int, profile: Profile, *,
                       step: Callable[[str], None], res: ScenarioResult) -> None:
    worst_wall = worst_server = 0.0
    async with httpx.AsyncClient(base_url=url, cookies={"edgesync_console": cookie}) as client:
        for label, params in VIEWS:
            step(f"GET /ui/fleet, {label}, {profile.console_requests} times")
            await client.get("/ui/fleet", params=params)  # warm-up: templates, plans
            walls, servers = [], []
            for _ in range(profile.console_requests):
                started = time.perf_counter()
                answer = await client.get("/ui/fleet", params=params)
                walls.append((time.perf_counter() - started) * 1000)
                if answer.status_code != 200:
                    raise RuntimeError(f"/ui/fleet {params}: {answer.status_code}")
                found = _TOTAL.search(answer.headers.get("server-timing", ""))
                servers.append(float(found.group(1)) if found else float("nan"))
            wall, server = _p95(walls), _p95(servers)
            worst_wall, worst_server = max(worst_wall, wall), max(worst_server, server)
            res.add(f"fleet page at {n:,} edges: {label}", wall, "ms",
                    f"p95 of {len(walls)}; median {statistics.median(walls):.1f} ms; "
                    f"handler (Server-Timing) p95 {server:.1f} ms")
    res.check(f"console fleet page at {n:,} edges, server time", "≤ 300 ms",
              f"{worst_wall:.1f} ms (worst view's p95, whole request; handler "
              f"{worst_server:.1f} ms)", worst_wall <= 300)
    res.data.update(edges=n, views=[v[0] for v in VIEWS])


async def _first_paint(url: str, cookie: str, n: int, profile: Profile, *,
                       step: Callable[[str], None], res: ScenarioResult) -> None:
    target = "≤ 1 s"
    figure = f"console first paint (fleet page, {n:,} edges)"
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        playwright: Any = None
    else:
        playwright = async_playwright
    if playwright is None or not CHROMIUM.exists():
        why = ("playwright is not installed" if playwright is None
               else f"no Chromium at {CHROMIUM}")
        res.add("console first paint", None, "ms", f"skipped: {why}")
        res.check(figure, target, f"skipped ({why})", None)
        return
    step(f"first paint of /ui/fleet in Chromium, {profile.console_paints} cold loads")
    paints: list[float] = []
    async with playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM),
                                           args=["--no-sandbox"])
        try:
            for _ in range(profile.console_paints):
                context = await browser.new_context(viewport={"width": 1280, "height": 800})
                await context.add_cookies([{"name": "edgesync_console", "value": cookie,
                                            "url": f"{url}/ui/"}])
                page = await context.new_page()
                await page.goto(f"{url}/ui/fleet", wait_until="load")
                fcp = await page.evaluate(
                    "new Promise(done => new PerformanceObserver((list, obs) => {"
                    " const e = list.getEntriesByName('first-contentful-paint')[0];"
                    " if (e) { obs.disconnect(); done(e.startTime); } })"
                    ".observe({type: 'paint', buffered: true}))")
                paints.append(float(fcp))
                await context.close()
        finally:
            await browser.close()
    median, worst = statistics.median(paints), max(paints)
    res.add("console first contentful paint", median, "ms",
            f"median of {len(paints)} cold loads (fresh context each); worst {worst:.0f} ms")
    res.check(figure, target, f"{median:.0f} ms (median; worst {worst:.0f} ms)",
              median <= 1000)
