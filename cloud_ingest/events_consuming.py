"""Consumes the edges' events on ``<prefix>.evt.>``: heartbeats keep the ``edges``
table current, and each further event type is stored by the writer registered
for it, all in one transaction per fetched group.

Events are consumed through their own durable consumer; every writer must be
idempotent (an upsert, or an insert keyed by the event's identity), because a
group is redelivered if the process dies before acking it. Undecodable events,
and events whose edge id does not match their subject, become dead letters; so
does an event PostgreSQL refuses, alone (:func:`cloud_ingest.isolating.write_each`),
while the valid events fetched with it are stored.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import asyncpg
import msgspec
import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import FetchTimeoutError

from broker.backoff import backoff_s
from broker.errors import DecodeError
from broker.protocol.events import Heartbeat, decode_event
from broker.protocol.tokens import is_valid_token
from broker.protocol.topology import Topology
from cloud_ingest.db_errors import DATABASE_ERRORS, Connection, as_temporary
from cloud_ingest.dead_letters import DeadLetter, insert_dead_letters
from cloud_ingest.isolating import write_each
from cloud_ingest.metrics import IngestMetrics

__all__ = ["NEWER_BY_EDGE_CLOCK", "AfterCommit", "EventWriter", "EventsConsumer"]

AfterCommit = Callable[[], None]
EventWriter = Callable[[Connection, list[Any]], Awaitable[AfterCommit | None]]
"""Stores a list of events of one type using the given connection, inside the group's
transaction; may return an action to run only once that transaction has committed."""

log = structlog.get_logger(__name__)
_json = msgspec.json.Encoder()

NEWER_BY_EDGE_CLOCK: Final = ("({stored} <= {new}"
                              " OR {stored} > now() + interval '1 minute')")
"""Whether a report sent at ``new`` by an edge's clock supersedes one sent at ``stored``.
An edge clock is stored at most a minute ahead of the cloud's, and a stored time
further ahead (written before that bound) never wins: one report from a clock gone
wrong (a bad RTC at boot, spoofed NTP) must not freeze what the cloud shows of the edge."""

_UPSERT = """
INSERT INTO edges AS e (edge_id, last_seen, version, buffer_records, buffer_bytes,
    buffer_max_bytes, unshipped_records, oldest_unshipped_age_s, disk_bytes, dropped, streams,
    edge_clock)
VALUES ($1, now(), $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10::jsonb,
    LEAST(to_timestamp($11), now() + interval '1 minute'))
ON CONFLICT (edge_id) DO UPDATE SET
    last_seen = now(),
    version = CASE WHEN {newer} THEN EXCLUDED.version ELSE e.version END,
    buffer_records = CASE WHEN {newer} THEN EXCLUDED.buffer_records ELSE e.buffer_records END,
    buffer_bytes = CASE WHEN {newer} THEN EXCLUDED.buffer_bytes ELSE e.buffer_bytes END,
    buffer_max_bytes = CASE WHEN {newer} THEN EXCLUDED.buffer_max_bytes
        ELSE e.buffer_max_bytes END,
    unshipped_records = CASE WHEN {newer} THEN EXCLUDED.unshipped_records
        ELSE e.unshipped_records END,
    oldest_unshipped_age_s = CASE WHEN {newer} THEN EXCLUDED.oldest_unshipped_age_s
        ELSE e.oldest_unshipped_age_s END,
    disk_bytes = CASE WHEN {newer} THEN EXCLUDED.disk_bytes ELSE e.disk_bytes END,
    dropped = CASE WHEN {newer} THEN EXCLUDED.dropped ELSE e.dropped END,
    streams = CASE WHEN {newer} THEN EXCLUDED.streams ELSE e.streams END,
    edge_clock = CASE WHEN {newer} THEN EXCLUDED.edge_clock ELSE e.edge_clock END
""".format(newer=NEWER_BY_EDGE_CLOCK.format(stored="e.edge_clock", new="EXCLUDED.edge_clock"))
"""A heartbeat always counts as a sign of life (``last_seen``); what it reports replaces
what is stored only if it was sent later by the edge's clock (JetStream may hand an
older one over after a newer), or if the stored one claims a time beyond the skew
allowed (:data:`NEWER_BY_EDGE_CLOCK`)."""


class EventsConsumer:
    """The events consumer of one ingest process (see the module docstring)."""

    def __init__(
        self,
        *,
        js: JetStreamContext,
        pool: asyncpg.Pool,
        topology: Topology,
        consumer: str,
        metrics: IngestMetrics,
        writers: Mapping[type, EventWriter] | None = None,
        on_heartbeats: EventWriter | None = None,
    ) -> None:
        """``writers`` maps further event types to the coroutine that stores a list of
        them inside the consumer's transaction (heartbeats are handled here);
        ``on_heartbeats`` also sees the heartbeats, after the upsert, in the same
        transaction (the trim floor reconciliation, :mod:`cloud_ingest.reconciling`)."""
        self._on_heartbeats = on_heartbeats
        self._writers: dict[type, EventWriter] = {Heartbeat: self._write_heartbeats}
        self._writers.update(writers or {})
        self._js = js
        self._pool = pool
        self._topology = topology
        self._consumer = f"{consumer}-events"
        self._metrics = metrics
        self._stopping = False
        self.on_fetch_failed: Callable[[], None] | None = None
        """Called on each failed fetch (:mod:`cloud_ingest.topology_keeping`)."""

    @property
    def durable(self) -> str:
        return self._consumer

    def begin_shutdown(self) -> None:
        self._stopping = True

    async def ensure_consumer(self) -> None:
        await self._js.add_consumer(
            self._topology.events_stream,
            ConsumerConfig(
                durable_name=self._consumer,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,  # events sent before the first ingest count too
                ack_wait=30,
                max_deliver=-1,
                filter_subject=self._topology.events_wildcard,
            ),
        )

    async def consume_forever(self) -> None:
        sub = await self._js.pull_subscribe_bind(
            self._consumer, stream=self._topology.events_stream
        )
        failures = 0
        try:
            while not self._stopping:
                try:
                    msgs = await sub.fetch(256, timeout=0.5)
                except (FetchTimeoutError, nats.errors.TimeoutError, TimeoutError):
                    continue  # idle: nothing to fetch is not a failure
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    failures += 1
                    log.warning("events_fetch_failed", error=f"{type(exc).__name__}: {exc}")
                    if self.on_fetch_failed is not None:
                        self.on_fetch_failed()
                    await asyncio.sleep(backoff_s(failures, base_s=0.25, cap_s=2.0))
                    continue
                failures = 0
                await self._handle(msgs)
        finally:
            with contextlib.suppress(Exception):  # the connection may already be gone
                await sub.unsubscribe()

    async def _write_heartbeats(self, conn: Connection, beats: list[Any]) -> AfterCommit | None:
        """Upsert each edge's latest heartbeat into ``edges``."""
        latest: dict[str, Heartbeat] = {}
        for beat in beats:
            prev = latest.get(beat.edge)
            if prev is None or prev.sent_at <= beat.sent_at:
                latest[beat.edge] = beat
        await conn.executemany(_UPSERT, [
            (b.edge, b.version, b.buffer_records, b.buffer_bytes,
             b.buffer_max_bytes, b.unshipped_records, b.oldest_unshipped_age_s,
             b.disk_bytes, _json.encode(b.dropped), _json.encode(b.streams), b.sent_at)
            for b in latest.values()
        ])
        self._metrics.heartbeats.inc(len(latest))
        if self._on_heartbeats is not None:
            return await self._on_heartbeats(conn, list(latest.values()))
        return None

    async def _handle(self, msgs: list[Msg]) -> None:
        by_type: dict[type, list[tuple[Msg, Any]]] = {}
        dead: list[tuple[Msg, str]] = []
        for m in msgs:
            try:
                event = decode_event(m.data)
            except DecodeError as exc:
                dead.append((m, str(exc)))
                continue
            # The decoder refuses an edge id that is not a token; checked here again because
            # events_subject raises on one, and a raise here would end the consumer (and the
            # ingest) on one edge's message, redelivered to every restart.
            if (not is_valid_token(event.edge)
                    or m.subject != self._topology.events_subject(event.edge)):
                dead.append((m, f"event of edge {event.edge!r} on subject {m.subject!r}"))
                continue
            if type(event) not in self._writers:
                dead.append((m, f"no handler for event type {type(event).__name__}"))
                continue
            by_type.setdefault(type(event), []).append((m, event))
        attempt = 0
        while True:
            after: list[AfterCommit] = []
            refused: list[tuple[Msg, str]] = []
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    for kind, items in by_type.items():
                        actions, bad = await write_each(
                            conn, self._writers[kind], [e for _, e in items])
                        after.extend(a for a in actions if a is not None)
                        refused.extend((items[i][0], reason) for i, reason in bad)
                    letters = [DeadLetter("event", m.subject, m.data, reason)
                               for m, reason in dead + refused]
                    await insert_dead_letters(conn, letters)
                break
            except DATABASE_ERRORS as exc:
                # Unavailable or not, retry: a server-side error we did not foresee must
                # not drop events, and acking is what would drop them.
                attempt += 1
                temporary = as_temporary(exc, attempt=attempt, cap_s=5.0)
                log.warning("events_write_failed", attempt=attempt, temporary=temporary is not None,
                            error=f"{type(exc).__name__}: {exc}")
                if self._stopping:
                    return  # unacked: redelivered to whoever runs next
                await asyncio.sleep(temporary.delay if temporary is not None
                                    else backoff_s(attempt, base_s=0.5, cap_s=5.0))
        if dead or refused:  # counted with the records' letters: one rate to watch per fleet
            self._metrics.dead_letters.inc(len(dead) + len(refused))
        for m, reason in refused:
            log.error("event_dead_lettered", subject=m.subject, reason=reason)
        for action in after:
            action()
        for m in msgs:
            try:
                await m.ack()
            except Exception as exc:
                log.debug("ack_failed", error=str(exc))
        log.debug("events_recorded", counts={k.__name__: len(v) for k, v in by_type.items()},
                  dead_letters=len(dead) + len(refused))
