"""JetStream -> PostgreSQL: the exactly-once ingest of record batches.

Each worker loop fetches a group of batches from the shared durable pull
consumer and writes it in one transaction:

1. decode every message; what does not decode, or whose edge id does not match
   its subject, becomes a ``dead_letters`` row with the reason;
2. binary COPY the rows straight into ``records`` (the optimistic path: in
   steady state nothing is a duplicate); if a row already exists the COPY fails
   with a unique violation, and the group is written again through a staging
   table with ``INSERT ... ON CONFLICT DO NOTHING`` (the replay path);
3. if Postgres rejects the data itself (a poison payload), the group is split
   to find the batches it rejects, which are dead-lettered, and the rest is
   written;
4. merge the group's seq ranges into ``committed_ranges``;
5. COMMIT, and only then ack the messages.

A crash anywhere before the commit loses nothing (JetStream redelivers); a
crash between commit and ack yields a redelivery that step 2 absorbs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import FetchTimeoutError

from broker.backoff import backoff_s
from broker.errors import DecodeError
from broker.protocol.topology import Topology
from broker.protocol.wire import CT_JSON, Batch, decode_batch
from cloud_ingest.metrics import IngestMetrics
from cloud_ingest.ranges import merge_ranges

__all__ = ["Connection", "GroupResult", "GroupWriter", "RecordsConsumer", "Row", "init_connection"]

log = structlog.get_logger(__name__)

_PG_EPOCH_US = 946_684_800_000_000
"""Microseconds from the Unix epoch to PostgreSQL's (2000-01-01)."""
_COLUMNS = (
    "edge_id", "stream", "epoch", "seq", "event_time", "received_at", "key", "headers",
    "payload", "payload_raw",
)
_json = msgspec.json.Encoder()

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
"""A connection, whether pooled or not."""
Row = tuple[str, str, int, int, int, int, str | None, bytes | None, bytes | None, bytes | None]


async def init_connection(conn: asyncpg.Connection) -> None:
    """Codecs of the ingest's connections: payloads and times pass through untouched.

    jsonb is sent as the JSON text we already hold (Postgres validates it), and
    timestamps as integer microseconds: no per-record Python objects.
    """
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", format="binary",
        encoder=lambda b: b"\x01" + b, decoder=lambda b: b[1:],
    )
    await conn.set_type_codec(
        "timestamptz", schema="pg_catalog", format="tuple",
        encoder=lambda us: (us - _PG_EPOCH_US,), decoder=lambda t: t[0] + _PG_EPOCH_US,
    )


@dataclass(slots=True)
class _Decoded:
    msg: Msg
    batch: Batch | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class GroupResult:
    batches: int
    records: int
    inserted: int
    dead_letters: int
    watermarks: list[tuple[str, str, int, int]]
    """``(edge, stream, epoch, watermark)`` after this commit, per key touched."""


class GroupWriter:
    """Writes one fetched group in one transaction (see module docstring)."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def decode(self, msg: Msg) -> _Decoded:
        try:
            batch = decode_batch(msg.data, msg.headers)
        except DecodeError as exc:
            return _Decoded(msg, None, str(exc))
        route = self.topology.parse_records_subject(msg.subject)
        if route is None:
            return _Decoded(msg, None, f"subject {msg.subject!r} is not a records subject")
        if route != (batch.edge, batch.stream):
            return _Decoded(
                msg, None,
                f"batch of edge {batch.edge!r} stream {batch.stream!r} arrived on subject "
                f"{msg.subject!r}",
            )
        return _Decoded(msg, batch, None)

    @staticmethod
    def rows(batch: Batch, received_us: int) -> list[Row]:
        edge, stream, epoch, first = batch.edge, batch.stream, batch.epoch, batch.first_seq
        return [
            (
                edge, stream, epoch, first + i, rec.ts, received_us, rec.key,
                _json.encode(rec.headers) if rec.headers else None,
                rec.payload if rec.ct == CT_JSON else None,
                None if rec.ct == CT_JSON else rec.payload,
            )
            for i, rec in enumerate(batch.records)
        ]

    async def write(self, conn: Connection, group: Sequence[_Decoded]) -> GroupResult:
        """Write a decoded group in one transaction; raises on database failure."""
        received_us = int(time.time() * 1_000_000)
        good = [d for d in group if d.batch is not None]
        dead = [(d.msg, d.reason or "invalid") for d in group if d.batch is None]
        inserted = 0
        watermarks: list[tuple[str, str, int, int]] = []
        async with conn.transaction():
            if good:
                # A redelivered or retransmitted batch whose range is already committed
                # needs no rows written at all (the replay case costs one lookup).
                seen = await self._committed(conn, [d.batch for d in good if d.batch])
                fresh = [d for i, d in enumerate(good) if i not in seen]
                rows = [r for d in fresh if d.batch for r in self.rows(d.batch, received_us)]
                try:
                    async with conn.transaction():  # savepoint around the whole attempt
                        inserted = await self._insert(conn, rows) if rows else 0
                except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError):
                    # Some batch holds data Postgres rejects: find it batch by batch.
                    fresh, rejected, inserted = await self._isolate_poison(
                        conn, fresh, received_us
                    )
                    dead.extend(rejected)
                    good = [d for i, d in enumerate(good) if i in seen] + fresh
                watermarks = await merge_ranges(conn, "ranges", [
                    (b.edge, b.stream, b.epoch, b.first_seq, b.last_seq)
                    for b in (d.batch for d in good) if b is not None
                ])
            if dead:
                await conn.executemany(
                    "INSERT INTO dead_letters(subject, headers, data, reason) "
                    "VALUES ($1, $2, $3, $4)",
                    [
                        (m.subject, _json.encode(dict(m.headers)) if m.headers else None,
                         m.data, reason)
                        for m, reason in dead
                    ],
                )
        records = sum(len(d.batch.records) for d in good if d.batch is not None)
        return GroupResult(len(good), records, inserted, len(dead), watermarks)

    @staticmethod
    async def _committed(conn: Connection, batches: Sequence[Batch]) -> set[int]:
        """Indexes of the batches whose whole seq range is already committed."""
        rows = await conn.fetch(
            "SELECT u.i - 1 AS i FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], "
            "$5::int8[]) WITH ORDINALITY AS u(edge_id, stream, epoch, lo, hi, i) "
            "JOIN committed_ranges c USING (edge_id, stream, epoch) "
            "WHERE c.ranges @> int8range(u.lo, u.hi)",
            [b.edge for b in batches], [b.stream for b in batches],
            [b.epoch for b in batches], [b.first_seq for b in batches],
            [b.last_seq + 1 for b in batches],
        )
        return {r["i"] for r in rows}

    async def _insert(self, conn: Connection, rows: list[Row]) -> int:
        """Insert rows, skipping identities already present; returns rows inserted."""
        try:
            async with conn.transaction():  # savepoint: a conflict must not doom the group
                await conn.copy_records_to_table("records", records=rows, columns=_COLUMNS)
            return len(rows)
        except asyncpg.UniqueViolationError:
            pass
        await conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS records_stage "
            "(LIKE records INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        await conn.copy_records_to_table("records_stage", records=rows, columns=_COLUMNS)
        status = await conn.execute(
            "INSERT INTO records SELECT * FROM records_stage ON CONFLICT DO NOTHING"
        )
        await conn.execute("TRUNCATE records_stage")
        return int(status.split()[-1])

    async def _isolate_poison(
        self, conn: Connection, good: list[_Decoded], received_us: int
    ) -> tuple[list[_Decoded], list[tuple[Msg, str]], int]:
        kept: list[_Decoded] = []
        rejected: list[tuple[Msg, str]] = []
        inserted = 0
        for d in good:
            assert d.batch is not None
            try:
                async with conn.transaction():
                    inserted += await self._insert(conn, self.rows(d.batch, received_us))
                kept.append(d)
            except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
                rejected.append((d.msg, f"rejected by PostgreSQL: {type(exc).__name__}: {exc}"))
                log.warning("batch_dead_lettered", subject=d.msg.subject, error=str(exc))
        return kept, rejected, inserted


class RecordsConsumer:
    """The worker loops of one ingest process on the shared durable consumer."""

    def __init__(
        self,
        *,
        nc: NATS,
        js: JetStreamContext,
        pool: asyncpg.Pool,
        topology: Topology,
        consumer: str,
        fetch_batch: int,
        fetch_timeout_s: float,
        ack_wait_s: float,
        workers: int,
        db_retry_max_s: float,
        metrics: IngestMetrics,
        on_committed: Callable[[list[tuple[str, str, int, int]]], None] | None = None,
    ) -> None:
        """``on_committed`` receives the watermarks of each group after its commit."""
        self._on_committed = on_committed
        self._nc = nc
        self._js = js
        self._pool = pool
        self._topology = topology
        self._consumer = consumer
        self._fetch_batch = fetch_batch
        self._fetch_timeout = fetch_timeout_s
        self._ack_wait = ack_wait_s
        self._workers = workers
        self._db_retry_max = db_retry_max_s
        self._metrics = metrics
        self._writer = GroupWriter(topology)
        self._stopping = False
        self.db_ok = True

    def begin_shutdown(self) -> None:
        """Stop fetching; groups in hand are finished (committed and acked)."""
        self._stopping = True

    async def ensure_consumer(self) -> None:
        config = ConsumerConfig(
            durable_name=self._consumer,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self._ack_wait,
            max_deliver=-1,
            max_ack_pending=20_000,
            filter_subject=self._topology.records_wildcard,
        )
        await self._js.add_consumer(self._topology.records_stream, config)

    async def consume_forever(self) -> None:
        sub = await self._js.pull_subscribe_bind(
            self._consumer, stream=self._topology.records_stream
        )
        try:
            async with asyncio.TaskGroup() as tg:
                for i in range(self._workers):
                    tg.create_task(self._worker(sub), name=f"ingest-worker-{i}")
        finally:
            with contextlib.suppress(Exception):  # the connection may already be gone
                await sub.unsubscribe()

    async def _worker(self, sub: JetStreamContext.PullSubscription) -> None:
        while not self._stopping:
            try:
                # nats-py first takes what is available at once (no_wait), else waits up
                # to the timeout for a group: a short timeout bounds a trickle's latency.
                # (Do not chain fetches with tiny timeouts: a timeout that races a
                # delivery can drop that message until JetStream redelivers it.)
                msgs = await sub.fetch(self._fetch_batch, timeout=self._fetch_timeout)
            except (FetchTimeoutError, nats.errors.TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS down or reconnecting: nats-py heals the link
                log.warning("fetch_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)
                continue
            if msgs:
                await self._handle_group(msgs)

    async def _handle_group(self, msgs: list[Msg]) -> None:
        decoded = [self._writer.decode(m) for m in msgs]
        attempt = 0
        last_progress = time.monotonic()
        while True:
            started = time.perf_counter()
            try:
                async with self._pool.acquire() as conn:
                    result = await self._writer.write(conn, decoded)
                break
            except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                    asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError,
                    TimeoutError) as exc:
                # Database unavailable: keep the group, do not ack, retry when it returns.
                attempt += 1
                self.db_ok = False
                self._metrics.db_up.set(0)
                delay = backoff_s(attempt, cap_s=self._db_retry_max)
                log.warning("database_unavailable", attempt=attempt, retry_in_s=round(delay, 2),
                            error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(delay)
                if time.monotonic() - last_progress > self._ack_wait / 3:
                    # Keep JetStream from redelivering a group we still hold.
                    for m in msgs:
                        await _quietly(m.in_progress())
                    last_progress = time.monotonic()
            except asyncpg.PostgresError as exc:
                # A server-side error we did not foresee: retry rather than drop or ack.
                attempt += 1
                log.error("group_write_failed", attempt=attempt,
                          error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(min(self._db_retry_max, 0.2 * attempt))
        if self._on_committed is not None:
            self._on_committed(result.watermarks)
        if not self.db_ok:
            log.info("database_available")
        self.db_ok = True
        self._metrics.db_up.set(1)
        for m in msgs:
            await _quietly(m.ack())
        metrics = self._metrics
        metrics.commit_seconds.observe(time.perf_counter() - started)
        metrics.batches_committed.inc(result.batches)
        metrics.records_committed.inc(result.inserted)
        metrics.duplicate_records.inc(result.records - result.inserted)
        metrics.dead_letters.inc(result.dead_letters)
        log.debug("records_committed", batches=result.batches, records=result.records,
                  inserted=result.inserted, dead_letters=result.dead_letters)


async def _quietly(aw: Any) -> None:
    try:
        await aw
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # an ack lost is a redelivery absorbed by the idempotent write
        log.debug("ack_failed", error=f"{type(exc).__name__}: {exc}")
