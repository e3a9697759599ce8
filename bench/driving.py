"""Driving load and waiting for it: SDK producers, and polls of what arrived where.

Producers run in the bench (driver) process, as edge applications would: each
is a task with its own :class:`~edge_bridge.sdk.EdgeClient`, publishing
synthetic payload dicts fire-and-forget (``send``: no future per record) and
flushing at the end, so a producer is done when every record it published is
durable at the bridge. ``produce(..., futures=True)`` publishes with a future
per record instead (``publish``), for the figure that shows what those cost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import httpx

from bench.data import STREAM, Pool
from bench.env import metric_total
from broker.errors import BufferFull
from broker.pg_connecting import connected
from edge_bridge.sdk import EdgeClient, SendFailed

__all__ = [
    "ProduceResult",
    "committed_records",
    "inserted_records",
    "produce",
    "produce_paced",
    "wait_committed",
    "wait_for",
    "wait_shipped",
]

_YIELD_EVERY = 256
"""Records published between yields to the event loop: the SDK's senders need it."""


@dataclass(frozen=True, slots=True)
class ProduceResult:
    records: int
    failed: int
    seconds: float
    """From the first publish to the last record durable at the bridge."""
    publish_seconds: float = 0.0
    """From the first publish to the last (paced producer)."""
    pushed_back: int = 0
    """Times the SDK refused a record (``max_pending_records`` reached) and the
    producer had to wait: the pipeline did not keep up with the offered rate."""


async def _one_producer(url: str, pool: Pool, offset: int, count: int, *,
                        futures: bool) -> int:
    size = len(pool)
    client = EdgeClient(url)
    publish = client.publish if futures else client.send
    try:
        async with client:
            i = 0
            while i < count:
                j = (offset + i) % size
                try:
                    publish(STREAM, pool.dicts[j], key=pool.keys[j])
                except BufferFull:
                    await asyncio.sleep(0.002)  # max_pending_records reached: let senders run
                    continue
                i += 1
                if i % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            await client.flush()
    except SendFailed:  # counted in stats, returned below
        pass
    return client.stats.records_failed


async def produce(url: str, pool: Pool, records: int, producers: int, *,
                  futures: bool = False) -> ProduceResult:
    """``records`` split over ``producers`` concurrent SDK clients, as fast as they go;
    with ``send``, or with ``publish`` and its future per record if ``futures``."""
    shares = [records // producers + (1 if i < records % producers else 0)
              for i in range(producers)]
    started = time.perf_counter()
    failed = await asyncio.gather(*(
        _one_producer(url, pool, offset=sum(shares[:i]), count=share, futures=futures)
        for i, share in enumerate(shares)
    ))
    return ProduceResult(records, sum(failed), time.perf_counter() - started)


async def produce_paced(url: str, pool: Pool, rate: float, seconds: float) -> ProduceResult:
    """One SDK client offering ``rate`` records/s for ``seconds``; event time = publish time.

    When the SDK pushes back (its ``max_pending_records`` are unconfirmed),
    the producer waits, as an application must, and the offered rate drops.
    """
    total = int(rate * seconds)
    size = len(pool)
    pushed_back = 0
    started = time.perf_counter()
    published = 0.0
    client = EdgeClient(url)
    try:
        async with client:
            sent = 0
            while sent < total:
                due = min(total, int((time.perf_counter() - started) * rate) + 1)
                while sent < due:
                    j = sent % size
                    try:
                        client.send(STREAM, pool.dicts[j], key=pool.keys[j])
                    except BufferFull:
                        pushed_back += 1
                        break
                    sent += 1
                await asyncio.sleep(0.002)
            published = time.perf_counter() - started
            await client.flush()
    except SendFailed:  # counted in stats
        pass
    failed = client.stats.records_failed
    return ProduceResult(total, failed, time.perf_counter() - started, published, pushed_back)


async def wait_for(predicate: Callable[[], Awaitable[bool]], *, timeout: float,
                   interval: float, what: str) -> float:
    """Poll until ``predicate`` holds; returns the wall time (Unix s) it was first seen."""
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():
            return time.time()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f} s")
        await asyncio.sleep(interval)


async def wait_shipped(
    url: str, records: int, *, timeout: float, interval: float = 0.05,
    first_seen: list[tuple[float, float]] | None = None,
) -> float:
    """Wait until the bridge at ``url`` has shipped ``records`` (JetStream acked them).

    Returns the wall time it was seen; appends ``(wall time, records shipped)``
    of the first poll that saw a shipment to ``first_seen`` if given.
    """
    # Plain http:// to the bridge: verify=False spares building a TLS context with
    # the CA bundle (~0.1 s of CPU per call, which the edge-path scenario would
    # count as the SDK's).
    async with httpx.AsyncClient(trust_env=False, verify=False) as client:
        async def shipped() -> bool:
            value = await metric_total(client, url, "edgesync_records_shipped_total")
            if first_seen is not None and value > 0 and not first_seen:
                first_seen.append((time.time(), value))
            return value >= records

        return await wait_for(shipped, timeout=timeout, interval=interval,
                              what=f"{records} records shipped")


async def committed_records(conn: asyncpg.Connection) -> int:
    """Records committed according to ``committed_ranges`` (cheap: one row per stream)."""
    return int(await conn.fetchval(
        "SELECT coalesce(sum(es_count(ranges)), 0) FROM committed_ranges"
    ))


async def inserted_records(conn: asyncpg.Connection) -> int:
    """Rows the ingest inserted, from the feed's one row per commit (``feed_commits.rows``).

    Cheap whatever the number of streams, where :func:`committed_records` reads every
    ``committed_ranges`` row: ~30 ms of PostgreSQL CPU per call at 4,000 keys (measured),
    and the fleet drain polled it every 20 ms, keeping a PostgreSQL backend busy beside
    the ingest it was timing. Counts inserted rows only (no dead letters)."""
    return int(await conn.fetchval("SELECT coalesce(sum(rows), 0) FROM feed_commits"))


async def wait_committed(dsn: str, records: int, *, timeout: float,
                         interval: float = 0.05) -> float:
    """Wait until ``committed_ranges`` counts ``records``; returns the wall time it was seen."""
    async with connected(dsn) as conn:
        async def all_committed() -> bool:
            return await committed_records(conn) >= records

        return await wait_for(all_committed, timeout=timeout, interval=interval,
                              what=f"{records} records committed")
