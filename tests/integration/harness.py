"""Running the real services inside a test: in-process (:func:`serving`), or as OS
processes to kill (:class:`~tests.support.BridgeProcess`, re-exported here)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

from broker.pg_connecting import connected
from broker.settings import BridgeSettings, IngestSettings, NatsSettings, ShipperSettings
from cloud_ingest.service import Ingest
from edge_bridge.bridge import Bridge
from tests.support import BridgeProcess, init_topology, until

__all__ = [
    "BridgeProcess",
    "bridge_settings",
    "buffered_is",
    "count_records",
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


async def buffered_is(bridge: Bridge, n: int) -> bool:
    """Whether the bridge's buffer holds exactly ``n`` records (for ``until``)."""
    return (await bridge.buffer.stats()).records == n


async def count_records(dsn: str, where: str = "true") -> int:
    async with connected(dsn) as conn:
        return int(await conn.fetchval(f"SELECT count(*) FROM v_records WHERE {where}"))


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
