"""Keeps the ``edges`` table current from the heartbeats on ``<prefix>.evt.>``.

Events are consumed through their own durable consumer; a heartbeat is an
upsert, so redelivery is harmless. Undecodable events become dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg
import msgspec
import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import FetchTimeoutError

from broker.errors import DecodeError
from broker.events import Heartbeat, decode_event
from broker.topology import Topology
from cloud_ingest.metrics import IngestMetrics

__all__ = ["EdgeTracker"]

log = structlog.get_logger(__name__)
_json = msgspec.json.Encoder()

_UPSERT = """
INSERT INTO edges AS e (edge_id, last_seen, version, buffer_records, buffer_bytes,
    buffer_max_bytes, unshipped_records, oldest_unshipped_age_s, disk_bytes, dropped, streams,
    edge_clock)
VALUES ($1, now(), $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10::jsonb, to_timestamp($11))
ON CONFLICT (edge_id) DO UPDATE SET
    last_seen = now(), version = EXCLUDED.version, buffer_records = EXCLUDED.buffer_records,
    buffer_bytes = EXCLUDED.buffer_bytes, buffer_max_bytes = EXCLUDED.buffer_max_bytes,
    unshipped_records = EXCLUDED.unshipped_records,
    oldest_unshipped_age_s = EXCLUDED.oldest_unshipped_age_s, disk_bytes = EXCLUDED.disk_bytes,
    dropped = EXCLUDED.dropped, streams = EXCLUDED.streams, edge_clock = EXCLUDED.edge_clock
WHERE e.edge_clock <= EXCLUDED.edge_clock
"""


class EdgeTracker:
    def __init__(
        self,
        *,
        js: JetStreamContext,
        pool: asyncpg.Pool,
        topology: Topology,
        consumer: str,
        metrics: IngestMetrics,
    ) -> None:
        self._js = js
        self._pool = pool
        self._topology = topology
        self._consumer = f"{consumer}-events"
        self._metrics = metrics
        self._stopping = False

    def begin_shutdown(self) -> None:
        self._stopping = True

    async def ensure_consumer(self) -> None:
        await self._js.add_consumer(
            self._topology.events_stream,
            ConsumerConfig(
                durable_name=self._consumer,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.NEW,
                ack_wait=30,
                max_deliver=-1,
                filter_subject=self._topology.events_wildcard,
            ),
        )

    async def track_forever(self) -> None:
        sub = await self._js.pull_subscribe_bind(
            self._consumer, stream=self._topology.events_stream
        )
        try:
            while not self._stopping:
                try:
                    msgs = await sub.fetch(256, timeout=0.5)
                except (FetchTimeoutError, nats.errors.TimeoutError):
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("events_fetch_failed", error=f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.5)
                    continue
                await self._handle(msgs)
        finally:
            with contextlib.suppress(Exception):  # the connection may already be gone
                await sub.unsubscribe()

    async def _handle(self, msgs: list[Msg]) -> None:
        latest: dict[str, Heartbeat] = {}
        dead: list[tuple[Msg, str]] = []
        for m in msgs:
            try:
                beat = decode_event(m.data)
            except DecodeError as exc:
                dead.append((m, str(exc)))
                continue
            if m.subject != self._topology.events_subject(beat.edge):
                dead.append((m, f"heartbeat of edge {beat.edge!r} on subject {m.subject!r}"))
                continue
            prev = latest.get(beat.edge)
            if prev is None or prev.sent_at <= beat.sent_at:
                latest[beat.edge] = beat
        while True:
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    await conn.executemany(_UPSERT, [
                        (b.edge, b.version, b.buffer_records, b.buffer_bytes,
                         b.buffer_max_bytes, b.unshipped_records, b.oldest_unshipped_age_s,
                         b.disk_bytes, _json.encode(b.dropped),
                         _json.encode(b.streams), b.sent_at)
                        for b in latest.values()
                    ])
                    if dead:
                        await conn.executemany(
                            "INSERT INTO dead_letters(subject, data, reason) VALUES ($1, $2, $3)",
                            [(m.subject, m.data, reason) for m, reason in dead],
                        )
                break
            except asyncpg.DataError as exc:
                # Permanent: these heartbeats will never fit; keep them as dead letters.
                log.error("heartbeats_rejected", error=f"{type(exc).__name__}: {exc}")
                dead = [(m, f"rejected by PostgreSQL: {exc}") for m in msgs]
                latest.clear()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("heartbeat_write_failed", error=f"{type(exc).__name__}: {exc}")
                if self._stopping:
                    return  # unacked: redelivered to whoever runs next
                await asyncio.sleep(1.0)
        for m in msgs:
            try:
                await m.ack()
            except Exception as exc:
                log.debug("ack_failed", error=str(exc))
        self._metrics.heartbeats.inc(len(latest))
        if latest:
            log.debug("heartbeats_recorded", edges=sorted(latest), at=time.time())
