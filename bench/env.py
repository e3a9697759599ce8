"""The bench's own servers and the helpers every scenario shares.

One PostgreSQL cluster (the embedded runtime, configured as ``edgesync up``
configures it: ``synchronous_commit`` on, ``fsync`` off) serves the whole run,
with a fresh database per measurement; each scenario gets a fresh
``nats-server`` with its own JetStream store, so no scenario inherits another's
streams, consumers or disk usage.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
from nats.aio.client import Client as NATS

from bench.pg_statements import statement_times
from bench.procs import CpuMeter, MeasuredService, PostgresCpu, ProcessCpu
from broker.pg_connecting import connected
from broker.runtime.children import settings_env
from broker.runtime.embedded_nats import EmbeddedNats, find_nats_server
from broker.runtime.embedded_postgres import EmbeddedPostgres, find_postgres_bindir
from broker.settings import BridgeSettings, IngestSettings, LogSettings, NatsSettings
from cloud_ingest.schema import migrate

__all__ = ["BenchEnv", "connect_nats", "init_topology", "machine_info", "metric_total"]

_LOG = LogSettings(level="info", format="json")
"""Services log at info: the start-up line reports the port they bound (and the
ingest's start time); nothing on the measured paths logs at info."""


@dataclass
class BenchEnv:
    """What a scenario runs against; built once per bench run."""

    workdir: Path
    postgres: EmbeddedPostgres
    profile_dir: Path | None = None
    profile_gil: bool = False
    """py-spy samples only the thread holding the GIL (``--py-spy-gil``)."""
    service_env: dict[str, str] = field(default_factory=dict)
    """``EDGESYNC_*`` overrides for every service process (``--service-env``)."""
    pg_statements: bool = False
    """PostgreSQL preloads ``pg_stat_statements`` (``--pg-statements``)."""

    def statement_times(self, dsn: str, data: dict[str, Any], name: str
                        ) -> contextlib.AbstractAsyncContextManager[None]:
        """:func:`bench.pg_statements.statement_times` of a measured window, when the
        run asked for them; otherwise nothing."""
        return statement_times(dsn if self.pg_statements else None, data, name)

    @contextlib.asynccontextmanager
    async def nats_server(self, name: str) -> AsyncIterator[EmbeddedNats]:
        """A fresh nats-server with JetStream; its store is deleted afterwards."""
        store = self.workdir / f"nats-{name}-{uuid.uuid4().hex[:6]}"
        server = EmbeddedNats(store, log_file=self.workdir / f"nats-{name}.log")
        await server.start()
        try:
            yield server
        finally:
            await server.stop()
            shutil.rmtree(store, ignore_errors=True)

    @contextlib.asynccontextmanager
    async def database(self, name: str) -> AsyncIterator[str]:
        """A fresh database with the edgesync schema applied; dropped afterwards."""
        db = f"bench_{name}_{uuid.uuid4().hex[:6]}"
        dsn = await self.postgres.create_database(db)
        async with connected(dsn) as conn:
            await migrate(conn)
        try:
            yield dsn
        finally:
            async with connected(self.postgres.dsn_for("postgres")) as admin:
                await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')

    def profile_file(self, name: str) -> Path | None:
        return None if self.profile_dir is None else self.profile_dir / f"{name}.txt"

    def bridge(
        self, name: str, nats_url: str, *, buffer_max_bytes: int = 1024**3,
        extra: dict[str, str] | None = None,
    ) -> MeasuredService:
        """A bridge process (not started) with its own buffer directory, on a port it picks."""
        settings = BridgeSettings(
            edge_id="edge-1",
            buffer_dir=self.workdir / f"buffer-{name}-{uuid.uuid4().hex[:6]}",
            buffer_max_bytes=buffer_max_bytes,
        )
        env = {
            **settings_env(bridge=settings, nats=NatsSettings(url=nats_url), log=_LOG),
            **(extra or {}),
            **self.service_env,
        }
        return MeasuredService(
            "bridge", env, log_file=self.workdir / f"bridge-{name}.log",
            profile_to=self.profile_file(f"bridge-{name}"), profile_gil=self.profile_gil,
        )

    def ingest(
        self, name: str, nats_url: str, dsn: str, *, consumer: str = "ingest",
        extra: dict[str, str] | None = None,
    ) -> MeasuredService:
        """An ingest process (not started), on a port it picks."""
        settings = IngestSettings(postgres_dsn=dsn, consumer=consumer)
        env = {
            **settings_env(ingest=settings, nats=NatsSettings(url=nats_url), log=_LOG),
            **(extra or {}),
            **self.service_env,
        }
        return MeasuredService(
            "ingest", env, log_file=self.workdir / f"ingest-{name}.log",
            profile_to=self.profile_file(f"ingest-{name}"), profile_gil=self.profile_gil,
        )

    def cpu_meter(self, nats_server: EmbeddedNats | None, **services: MeasuredService) -> CpuMeter:
        """A meter over the driver, nats-server, PostgreSQL and the given services."""
        meter = CpuMeter()
        meter.add("bench driver", ProcessCpu(os.getpid()))
        if nats_server is not None and nats_server.pid is not None:
            meter.add("nats-server", ProcessCpu(nats_server.pid))
        if self.postgres.pid is not None:
            meter.add("postgres", PostgresCpu(self.postgres.pid))
        for name, service in services.items():
            meter.add(name, ProcessCpu(service.pid))
        return meter


async def connect_nats(url: str) -> NATS:
    return await nats.connect(url, name="edgesync-bench", max_reconnect_attempts=3)


async def init_topology(url: str) -> None:
    """What ``edgesync streams init`` does, for scenarios that run a bridge without an
    ingest: the cloud owns the streams, and a bridge only waits for them."""
    from broker.protocol.topology import Topology

    nc = await connect_nats(url)
    try:
        js = nc.jetstream(timeout=10)
        await Topology().ensure_all(js)
    finally:
        await nc.close()


async def metric_total(client: httpx.AsyncClient, url: str, name: str) -> float:
    """Sum of a Prometheus counter's samples at ``url``/metrics (0 if unreachable)."""
    try:
        text = (await client.get(f"{url}/metrics", timeout=5)).text
    except httpx.TransportError:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (len(line) > len(name) and line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _git_state() -> str:
    """The commit the product code came from, and whether the tree had local changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              check=True, capture_output=True, text=True, timeout=10).stdout
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "broker", "edge_bridge", "cloud_ingest"],
                               check=True, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return head.strip() + (" with uncommitted product changes" if dirty.strip() else "")


def machine_info(postgres: EmbeddedPostgres | None = None) -> dict[str, object]:
    """The machine the figures came from."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ram_gib = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 1024**2, 1)
    versions: dict[str, str] = {}
    with contextlib.suppress(Exception):
        versions["nats-server"] = subprocess.run(
            [str(find_nats_server()), "--version"],
            check=False, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    with contextlib.suppress(Exception):
        versions["postgres"] = subprocess.run(
            [str(find_postgres_bindir() / "postgres"), "-V"],
            check=False, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    return {
        "code": _git_state(),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "ram_gib": ram_gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        **versions,
    }

