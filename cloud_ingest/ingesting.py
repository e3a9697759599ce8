"""JetStream -> PostgreSQL: the exactly-once ingest of record batches.

Each worker loop fetches a group of batches from the shared durable pull
consumer and writes it in one transaction (:mod:`cloud_ingest.writing`):
decode and validate every record, COPY the good ones, dead-letter each bad
one with its identity (narrowing PostgreSQL's refusals down to the record),
merge committed and dead-lettered seqs into ``committed_ranges``, COMMIT, and
only then ack the messages.

A crash anywhere before the commit loses nothing (JetStream redelivers); a
crash between commit and ack yields a redelivery the idempotent write absorbs.

No input stops the ingest:

- decoding is bounded (:mod:`broker.protocol.wire` caps) and a fetched group
  is decoded and written in parts that fit ``group_budget_bytes``;
- a database outage keeps the group, unacked, and retries with backoff;
- any other failure of a group is retried with backoff, then the group is
  split message by message, and a message that still fails alone is
  dead-lettered whole (its seqs accounted when its identity is known) and
  acked: it never reaches the worker loop, let alone the service.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from broker.backoff import backoff_s
from broker.protocol.topology import Topology
from broker.settings import IngestSettings
from cloud_ingest.bulk_publishing import ack_all
from cloud_ingest.db_errors import as_temporary, is_contention
from cloud_ingest.direct_delivery import header_of
from cloud_ingest.gc_pausing import held_gc, paused_gc
from cloud_ingest.metrics import IngestMetrics
from cloud_ingest.pulling import Puller
from cloud_ingest.writing import Decoded, GroupResult, GroupWriter

__all__ = [
    "GROUP_FAILURES_BEFORE_SPLIT",
    "RecordsConsumer",
    "init_connection",
]

log = structlog.get_logger(__name__)

_PG_EPOCH_US = 946_684_800_000_000
"""Microseconds from the Unix epoch to PostgreSQL's (2000-01-01)."""
GROUP_FAILURES_BEFORE_SPLIT = 3
"""Unexpected failures of one group (not a database outage) before it is split
message by message, and then before a lone message is dead-lettered whole."""


async def init_connection(conn: asyncpg.Connection) -> None:
    """Codecs of the ingest's connections: payloads and times pass through untouched.

    json and jsonb are sent as the JSON text we already hold (Postgres validates it), and
    timestamps as integer microseconds: no per-record Python objects.
    """
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", format="binary",
        encoder=lambda b: b"\x01" + b, decoder=lambda b: b[1:],
    )
    # records.payload and headers (migration 010): the text as is. json's binary form is
    # its text, as bytea's is its bytes: asyncpg's own bytea codec passes the bytes with
    # no Python call per value (a lambda codec cost one per payload in every COPY).
    await conn.set_builtin_type_codec("json", schema="pg_catalog", codec_name="bytea")
    await conn.set_type_codec(
        "timestamptz", schema="pg_catalog", format="tuple",
        encoder=lambda us: (us - _PG_EPOCH_US,), decoder=lambda t: t[0] + _PG_EPOCH_US,
    )


class RecordsConsumer:
    """The worker loops of one ingest process on the shared durable consumer."""

    def __init__(
        self,
        *,
        nc: NATS,
        js: JetStreamContext,
        pool: asyncpg.Pool,
        topology: Topology,
        settings: IngestSettings,
        metrics: IngestMetrics,
        on_committed: Callable[[list[tuple[str, str, int, int]]], None] | None = None,
        on_repeated: Callable[[list[tuple[str, str, int, int]]], None] | None = None,
    ) -> None:
        """``settings`` name the consumer and size its fetches, groups and retries;
        ``on_committed`` receives the watermarks of each group after its commit, and
        ``on_repeated`` those of the keys it only repeated (``GroupResult.repeated``)."""
        self._settings = settings
        self._nc = nc
        self._js = js
        self._pool = pool
        self._topology = topology
        self._budget = _GroupBudget(settings.group_max_messages, settings.group_max_records,
                                    settings.group_max_bytes)
        self._metrics = metrics
        self._on_committed = on_committed
        self._on_repeated = on_repeated
        self._writer = GroupWriter(topology, max_keys_per_edge=settings.max_keys_per_edge)
        self._stopping = False
        self._stop = asyncio.Event()
        self.db_ok = True
        self.on_fetch_failed: Callable[[], None] | None = None
        """Called on each failed fetch: the consumer or its stream may be gone
        (:mod:`cloud_ingest.topology_keeping`)."""

    def begin_shutdown(self) -> None:
        """Stop fetching; groups in hand are finished (committed and acked)."""
        self._stopping = True
        self._stop.set()  # ends the idle workers' long polls now

    async def ensure_consumer(self) -> None:
        config = ConsumerConfig(
            durable_name=self._settings.consumer,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self._settings.ack_wait_s,
            max_deliver=-1,
            max_ack_pending=20_000,
            filter_subject=self._topology.records_wildcard,
        )
        await self._js.add_consumer(self._topology.records_stream, config)

    async def consume_forever(self) -> None:
        # A puller per worker: a puller serves one fetch at a time (cloud_ingest.pulling).
        pullers = [Puller(self._nc, self._topology.records_stream, self._settings.consumer)
                   for _ in range(self._settings.workers)]
        try:
            for sub in pullers:
                await sub.start()
            async with asyncio.TaskGroup() as tg:
                for i, sub in enumerate(pullers):
                    tg.create_task(self._worker(sub), name=f"ingest-worker-{i}")
        finally:
            for sub in pullers:
                await sub.close()

    async def _worker(self, sub: Puller) -> None:
        failures = 0
        idle = False
        while not self._stopping:
            try:
                msgs = await self._fetch_group(sub, idle=idle)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS down or reconnecting: nats-py heals the link
                failures += 1
                log.warning("fetch_failed", error=f"{type(exc).__name__}: {exc}")
                if self.on_fetch_failed is not None:
                    self.on_fetch_failed()  # or the consumer is gone: checked, made again
                await asyncio.sleep(backoff_s(failures, base_s=0.25, cap_s=2.0))
                continue
            failures = 0
            idle = not msgs
            if idle:
                continue
            try:
                await self._handle_group(msgs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # last resort: unacked, JetStream redelivers later
                self._metrics.group_failures.labels(type(exc).__name__).inc()
                log.exception("group_abandoned", messages=len(msgs),
                              error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)

    async def _fetch_group(self, sub: Puller, *, idle: bool) -> list[Msg]:
        """One group, sized by work: records and bytes, with a message cap.

        An ``idle`` worker (its last fetch found nothing) first waits up to
        ``idle_poll_s`` for one message, with one pull request of one message (a
        request for more would linger until it filled), so an idle ingest costs
        JetStream and itself one request per worker per interval, not one per fill
        timeout. A message that arrives as that request expires is not lost: the
        :class:`~cloud_ingest.pulling.Puller` keeps it, and the next fetch takes it first.

        Then the first fetch asks for ``fetch_batch`` messages: it takes what is
        available at once (no_wait), else waits up to the fill timeout. Only while a
        backlog is evident (the last fetch came back full) does the group grow by
        further fetches, each asking for what the budget has left at the records and
        bytes per message seen so far, so that a fleet's 10-record batches fill a
        transaction as one edge's 2,000-record batches do. Those fetches return at
        once from the backlog; a trickle never chains fetches. (Chaining fetches with
        tiny timeouts on a trickle is what once let a timeout race a delivery and
        strand a message until JetStream redelivered it.)
        """
        budget = self._budget
        msgs: list[Msg] = []
        records = nbytes = 0
        if idle:
            # One long request for one message; shutdown ends it at once.
            msgs = await sub.fetch(1, timeout=self._settings.idle_poll_s, interrupt=self._stop)
            if not msgs:
                return msgs
            records, nbytes = _records_hint(msgs[0]), len(msgs[0].data)
        started = time.monotonic()
        ask = min(self._settings.fetch_batch, budget.messages - len(msgs))
        while ask > 0:
            try:
                got = await sub.fetch(ask, timeout=self._settings.fetch_timeout_s)
            except Exception:
                if msgs:
                    return msgs  # a group in hand is written now, not left to ack_wait
                raise
            if not got:
                return msgs
            msgs.extend(got)
            for m in got:
                records += _records_hint(m)
                nbytes += len(m.data)
            if (len(got) < ask or time.monotonic() - started > self._settings.fetch_timeout_s
                    or len(msgs) >= budget.messages or records >= budget.records
                    or nbytes >= budget.bytes):
                return msgs
            ask = budget.next_ask(len(msgs), records, nbytes)
        return msgs

    async def _handle_group(self, msgs: list[Msg]) -> None:
        """Decode ``msgs`` one by one and write them in parts within the memory budget."""
        start = 0
        carried: Decoded | None = None
        while start < len(msgs):
            # The GC stays paused until the part's objects are freed (bounded, even if
            # the commit waits on an outage: cloud_ingest.gc_pausing).
            with held_gc():
                part, start, carried = self._decode_part(msgs, start, carried)
                await self._commit(part)
                del part

    def _decode_part(self, msgs: list[Msg], start: int, carried: Decoded | None
                     ) -> tuple[list[Decoded], int, Decoded | None]:
        """Decode ``msgs[start:]`` (``carried``: ``msgs[start]`` decoded already) until
        the memory budget is reached; returns the part, the index of the first message
        left, and that message decoded (if it was).

        With the cyclic GC paused (no await here; :mod:`cloud_ingest.gc_pausing`):
        a fleet's group decodes a thousand small batches, and the GC rescanning their
        objects cost more than a third of decoding them (measured)."""
        part: list[Decoded] = []
        cost = 0
        writer = self._writer
        left: tuple[int, Decoded | None] = (len(msgs), None)
        with paused_gc():
            for k in range(start, len(msgs)):
                decoded = (carried if k == start and carried is not None
                           else writer.decode(msgs[k], validate=False, json_syntax=False))
                if part and cost + decoded.cost > self._settings.group_budget_bytes:
                    left = (k, decoded)
                    break
                part.append(decoded)
                cost += decoded.cost
            # The part's records checked together, not per batch; the syntax of their
            # JSON payloads left to PostgreSQL (cloud_ingest.writing says why).
            writer.validate(part, json_syntax=False)
        return part, *left

    async def _commit(self, decoded: list[Decoded]) -> None:
        """Write, commit and ack ``decoded``; contain any failure to it (module docstring)."""
        attempt = failures = 0
        dead_lettering = False  # the group is one message, now only its dead letter
        last_progress = time.monotonic()
        while True:
            if time.monotonic() - last_progress > self._settings.ack_wait_s / 3:
                # Keep JetStream from redelivering a group we still hold (through an
                # outage, contention or failures alike).
                await _holding(decoded)
                last_progress = time.monotonic()
            started = time.perf_counter()
            try:
                async with self._pool.acquire() as conn:
                    result = await self._writer.write(conn, decoded)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                temporary = as_temporary(exc, attempt=attempt + 1,
                                         cap_s=self._settings.db_retry_max_s)
                if temporary is not None:
                    # Database unavailable or busy: keep the group, do not ack, retry.
                    attempt += 1
                    canceled = isinstance(exc, asyncpg.QueryCanceledError)
                    if canceled and len(decoded) > 1:
                        # A statement_timeout the group's write outlasts (or a DBA's
                        # cancel): retried whole, a group too big for the timeout would
                        # stall the ingest for ever. Each half commits on its own; the
                        # half that waits is kept from redelivery first.
                        self._metrics.group_contentions.inc()
                        log.warning("group_write_canceled", messages=len(decoded),
                                    error=f"{type(exc).__name__}: {exc}")
                        half = len(decoded) // 2
                        await _holding(decoded)
                        await self._commit(decoded[:half])
                        await _holding(decoded[half:])
                        await self._commit(decoded[half:])
                        return
                    if canceled or is_contention(exc):  # the database is up: not an outage
                        self._metrics.group_contentions.inc()
                        log.warning("group_write_contended", attempt=attempt,
                                    retry_in_s=round(temporary.delay, 2),
                                    error=f"{type(exc).__name__}: {exc}")
                    else:
                        self.db_ok = False
                        self._metrics.db_up.set(0)
                        log.warning("database_unavailable", attempt=attempt,
                                    retry_in_s=round(temporary.delay, 2),
                                    error=f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(temporary.delay)
                    continue
                # Not an outage: something about this group. Retry a few times (it may
                # be transient), then narrow it down; never let it reach the worker.
                failures += 1
                self._metrics.group_failures.labels(type(exc).__name__).inc()
                error = f"{type(exc).__name__}: {exc}"
                log.error("group_write_failed", attempt=failures, messages=len(decoded),
                          error=error)
                if failures >= GROUP_FAILURES_BEFORE_SPLIT:
                    if len(decoded) > 1:
                        for one in decoded:
                            await self._commit([one])
                        return
                    only = decoded[0]
                    if dead_lettering and not only.bare:
                        # Its dead letter cannot be written as it is: once more without
                        # what came from the sender beside the bytes (headers, the seqs
                        # the envelope claims), so that the message can be acked. Seqs
                        # not accounted here come again if the edge sends them again.
                        decoded = [Decoded(
                            only.msg, None,
                            f"{only.reason}; its dead letter could not be written with "
                            f"the message's headers and seqs: {error}", None, only.cost,
                            bare=True)]
                        failures = 0
                        log.error("message_dead_lettered_bare", subject=only.msg.subject,
                                  error=error)
                        continue
                    if dead_lettering:
                        # Even its bare dead letter cannot be written: leave it unacked.
                        log.error("message_abandoned", subject=only.msg.subject, error=error)
                        return
                    dead_lettering = True
                    decoded = [Decoded(
                        only.msg, None,
                        f"ingest failed on it {failures} times: {error}", only.span,
                        only.cost)]
                    failures = 0
                    log.error("message_dead_lettered", subject=only.msg.subject, error=error)
                    continue
                await asyncio.sleep(backoff_s(failures, cap_s=self._settings.db_retry_max_s))
        await self._committed(result, [d.msg for d in decoded], started)

    async def _committed(self, result: GroupResult, msgs: list[Msg], started: float) -> None:
        if self._on_committed is not None:
            self._on_committed(result.watermarks)
        if self._on_repeated is not None and result.repeated:
            self._on_repeated(result.repeated)
        if not self.db_ok:
            log.info("database_available")
        self.db_ok = True
        self._metrics.db_up.set(1)
        await _quietly(ack_all(self._nc, msgs))  # one write for the group's acks
        metrics = self._metrics
        metrics.commit_seconds.observe(time.perf_counter() - started)
        metrics.batches_committed.inc(result.batches)
        metrics.records_committed.inc(result.inserted)
        metrics.duplicate_records.inc(
            max(0, result.records - result.inserted - result.dead_lettered_records))
        metrics.dead_letters.inc(result.dead_letters)
        if result.keys_refused:
            metrics.keys_refused.inc(result.keys_refused)
        metrics.dead_lettered_records.inc(result.dead_lettered_records)
        log.debug("records_committed", batches=result.batches, records=result.records,
                  inserted=result.inserted, dead_letters=result.dead_letters)


@dataclass(frozen=True, slots=True)
class _GroupBudget:
    """How much work one group (one transaction) may carry."""

    messages: int
    records: int
    bytes: int

    def next_ask(self, msgs: int, records: int, nbytes: int) -> int:
        """Messages to fetch next so that the group reaches, but does not overshoot,
        its budget at the records and bytes per message seen so far."""
        per_msg_records = max(1.0, records / msgs)
        per_msg_bytes = max(1.0, nbytes / msgs)
        return max(1, min(
            self.messages - msgs,
            math.ceil((self.records - records) / per_msg_records),
            math.ceil((self.bytes - nbytes) / per_msg_bytes),
        ))


def _records_hint(msg: Msg) -> int:
    """Records a batch message carries, read from its ``Nats-Msg-Id``
    (``<edge>.<stream>.<epoch>.<first>-<last>[.r<n>]``) without decoding the body;
    1 if it has none (the budget then counts it by its bytes and as one message)."""
    parts = (header_of(msg, "Nats-Msg-Id") or "").split(".")
    if len(parts) < 4:
        return 1
    first, _, last = parts[3].partition("-")
    try:
        return max(1, int(last) - int(first) + 1)
    except ValueError:
        return 1


async def _holding(decoded: list[Decoded]) -> None:
    """Tell JetStream the group's messages are still being worked on (``in_progress``),
    so that it does not redeliver them to another worker meanwhile."""
    for d in decoded:
        await _quietly(d.msg.in_progress())


async def _quietly(aw: Any) -> None:
    try:
        await aw
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # an ack lost is a redelivery absorbed by the idempotent write
        log.debug("ack_failed", error=f"{type(exc).__name__}: {exc}")
