"""Running the real services inside a test: in-process, or as OS processes to kill."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg
import httpx
import nats

from broker.protocol.topology import Topology
from broker.settings import BridgeSettings, IngestSettings, NatsSettings, ShipperSettings
from cloud_ingest.service import Ingest
from edge_bridge.bridge import Bridge
from tests.helpers import until

__all__ = [
    "BridgeProcess",
    "bridge_settings",
    "count_records",
    "free_port",
    "init_topology",
    "running_bridge",
    "running_ingest",
    "serving",
    "wait_for_records",
]


def bridge_settings(tmp: Path, edge: str = "edge-1", **overrides: object) -> BridgeSettings:
    fields: dict[str, object] = {
        "edge_id": edge,
        "port": 0,
        "buffer_dir": tmp / f"buffer-{edge}",
        "heartbeat_interval_s": 0.5,
        "shipper": ShipperSettings(linger_ms=2),
    }
    fields.update(overrides)
    return BridgeSettings(**fields)  # type: ignore[arg-type]


class _Service(Protocol):
    async def __aenter__(self) -> Any: ...
    async def __aexit__(self, *exc: object) -> None: ...
    async def serve(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None: ...


S = TypeVar("S", bound=_Service)


@contextlib.asynccontextmanager
async def serving(service: S) -> AsyncIterator[S]:
    """Open a service, run its ``serve`` until ready, and stop it cleanly afterwards."""
    stop = asyncio.Event()
    ready = asyncio.Event()
    async with service:
        task = asyncio.create_task(service.serve(stop, ready))
        await asyncio.wait_for(ready.wait(), 10)
        try:
            yield service
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


async def init_topology(nats_url: str, **topology: Any) -> None:
    """Create the streams and the watermark bucket, as ``edgesync streams init`` does.

    The cloud owns the topology and a bridge only waits for it, so a test that runs a
    bridge before (or without) an ingest plays the admin step first. NATS down (a test
    of an outage): nothing to do, the ingest started later creates them."""
    try:
        nc = await nats.connect(nats_url.split(","), connect_timeout=1,
                                allow_reconnect=False)
    except Exception:
        return
    try:
        js = nc.jetstream()
        await Topology(**topology).ensure_streams(js)
        await Topology(**topology).ensure_watermark_bucket(js)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def running_bridge(settings: BridgeSettings, nats_url: str) -> AsyncIterator[Bridge]:
    await init_topology(nats_url)
    async with serving(Bridge(settings, NatsSettings(url=nats_url, publish_timeout_s=2))) as b:
        yield b


@contextlib.asynccontextmanager
async def running_ingest(dsn: str, nats_url: str, **overrides: object) -> AsyncIterator[Ingest]:
    fields: dict[str, object] = {"postgres_dsn": dsn, "port": 0, "db_retry_max_s": 0.5}
    fields.update(overrides)
    settings = IngestSettings(**fields)  # type: ignore[arg-type]
    async with serving(Ingest(settings, NatsSettings(url=nats_url))) as ingest:
        yield ingest


async def count_records(dsn: str, where: str = "true") -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM records WHERE {where}"))
    finally:
        await conn.close()


class BridgeProcess:
    """``python -m broker bridge`` as a child process, for kill -9 tests."""

    def __init__(self, settings: BridgeSettings, nats_url: str, log_file: Path) -> None:
        self.settings = settings
        self.nats_url = nats_url
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> Mapping[str, str]:
        s = self.settings
        return {
            **os.environ,
            "EDGESYNC_BRIDGE__EDGE_ID": s.edge_id,
            "EDGESYNC_BRIDGE__PORT": str(s.port),
            "EDGESYNC_BRIDGE__BUFFER_DIR": str(s.buffer_dir),
            "EDGESYNC_BRIDGE__HEARTBEAT_INTERVAL_S": str(s.heartbeat_interval_s),
            "EDGESYNC_BRIDGE__SHIPPER__LINGER_MS": str(s.shipper.linger_ms),
            "EDGESYNC_NATS__URL": self.nats_url,
            "EDGESYNC_NATS__PUBLISH_TIMEOUT_S": "2",
            "EDGESYNC_LOG__LEVEL": "info",
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    async def start(self) -> None:
        assert self.settings.port, "a bridge process needs a fixed port to be found again"
        await init_topology(self.nats_url)
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "broker", "bridge"],
                env=dict(self.env()),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        async def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"bridge exited: {self.log_file.read_text()[-2000:]}")
            try:
                async with httpx.AsyncClient() as client:
                    return (await client.get(f"{self.url}/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await until(ready, timeout=20, interval=0.05, message="bridge process not ready")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def stop(self) -> int:
        """SIGTERM and wait (bounded); returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, 25)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for_records(
    dsn: str, expected: int, *, timeout: float = 30.0, where: str = "true"
) -> None:
    """Wait until exactly ``expected`` rows match, failing with the last count seen."""
    seen = -1

    async def reached() -> bool:
        nonlocal seen
        seen = await count_records(dsn, where)
        return seen == expected

    try:
        await until(reached, timeout=timeout, interval=0.1)
    except AssertionError:
        raise AssertionError(f"expected {expected} records, saw {seen}") from None
