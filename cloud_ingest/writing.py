"""One fetched group of record batches -> one PostgreSQL transaction, bad records isolated.

:meth:`GroupWriter.decode` turns a message into a :class:`Decoded`: the batch's
envelope, each record decoded on its own and checked by the shared validator
(:mod:`broker.protocol.validation`). It never raises.

:meth:`GroupWriter.write` then, in one transaction:

1. skips batches whose whole range is already accounted (a redelivery);
2. binary COPYs the valid records' rows into ``records`` (a duplicate switches
   to ``INSERT ... ON CONFLICT DO NOTHING`` through a staging table);
3. if PostgreSQL still rejects the data (rules drift, a check the validator
   does not know), bisects the rows down to the records it rejects, so every
   good record commits and each bad one is isolated;
4. writes a dead letter per bad record with its identity, reason and bytes
   (and per undecodable message), merges committed seqs into ``ranges`` and
   dead-lettered ones into ``dead_lettered``;
5. adds the group's entry to the commit-ordered feed (:mod:`cloud_ingest.feeding`):
   the spans of the rows it inserted and the new watermarks;
6. returns the new watermarks; the caller commits, then acks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
import msgspec
import structlog
from nats.aio.msg import Msg

from broker.errors import DecodeError
from broker.protocol.topology import Topology
from broker.protocol.validation import record_problem
from broker.protocol.wire import CT_JSON, Batch, DecodedBatch, Record, decode_records
from cloud_ingest.db_errors import Connection
from cloud_ingest.dead_letters import DeadLetter, insert_dead_letters
from cloud_ingest.feeding import record_commit
from cloud_ingest.isolating import REJECTED, refusal
from cloud_ingest.ranges import Span, Watermark, merge_ranges, spans_of

__all__ = ["ROW_OVERHEAD_BYTES", "Decoded", "GroupResult", "GroupWriter", "Key", "Row"]

log = structlog.get_logger(__name__)

Row = tuple[str, str, int, int, int, int, str | None, bytes | None, bytes | None, bytes | None]
Key = tuple[str, str, int, int]
"""A record's identity: ``(edge, stream, epoch, seq)``."""
_COLUMNS = (
    "edge_id", "stream", "epoch", "seq", "event_time", "received_at", "key", "headers",
    "payload", "payload_raw",
)
ROW_OVERHEAD_BYTES = 400
"""Python memory one decoded record costs besides its payload (Record, row tuple,
ints): measured ~300 B; used to budget the records a worker holds at once."""
_json = msgspec.json.Encoder()
_msgpack = msgspec.msgpack.Encoder()


@dataclass(slots=True)
class Decoded:
    """A message as far as it decodes."""

    msg: Msg
    batch: DecodedBatch | None
    reason: str | None = None
    """Why the message as a whole cannot be written (``batch`` is None then)."""
    span: Span | None = None
    """The seqs a message-level failure accounts for, when its identity is trusted."""
    cost: int = 0
    """Estimated bytes of memory this decoded message holds."""
    bad: dict[int, str] = field(default_factory=dict)
    """Record index -> reason, for records that must be dead-lettered."""


@dataclass(frozen=True, slots=True)
class GroupResult:
    batches: int
    records: int
    inserted: int
    dead_letters: int
    dead_lettered_records: int
    watermarks: list[Watermark]
    """``(edge, stream, epoch, watermark)`` after this commit, per key touched."""


class GroupWriter:
    """Writes one fetched group in one transaction (see module docstring)."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def decode(self, msg: Msg) -> Decoded:
        """Decode and validate ``msg``; never raises."""
        route = self.topology.parse_records_subject(msg.subject)
        try:
            batch = decode_records(msg.data, msg.headers)
        except DecodeError as exc:
            span = exc.span if exc.span and route == exc.span[:2] else None
            return Decoded(msg, None, str(exc), span, len(msg.data))
        except Exception as exc:  # decoding is total; a bug there must not stop the ingest
            return Decoded(msg, None, f"decoder failed: {type(exc).__name__}: {exc}", None,
                           len(msg.data))
        if route is None:
            return Decoded(msg, None, f"subject {msg.subject!r} is not a records subject",
                           None, len(msg.data))
        if route != (batch.edge, batch.stream):
            return Decoded(
                msg, None,
                f"batch of edge {batch.edge!r} stream {batch.stream!r} arrived on subject "
                f"{msg.subject!r}", None, len(msg.data),
            )
        bad = {i: reason for i, reason, _ in batch.problems}
        for i, rec in enumerate(batch.records):
            if rec is not None:
                problem = record_problem(rec)
                if problem:
                    bad[i] = problem
        cost = batch.body_bytes + len(batch.records) * ROW_OVERHEAD_BYTES
        return Decoded(msg, batch, None, batch.span, cost, bad)

    @staticmethod
    def rows(batch: Batch, received_us: int) -> list[Row]:
        """The rows of a whole (valid) batch."""
        return [
            _row((batch.edge, batch.stream, batch.epoch), batch.first_seq + i, rec, received_us)
            for i, rec in enumerate(batch.records)
        ]

    async def write(self, conn: Connection, group: Sequence[Decoded]) -> GroupResult:
        """Write a decoded group in one transaction; raises on database failure."""
        received_us = time.time_ns() // 1000
        letters: list[DeadLetter] = []
        committed: list[Span] = []
        batches = records = inserted = 0
        wm: dict[tuple[str, str, int], int] = {}
        async with conn.transaction():
            for d in group:
                if d.batch is None:
                    letters.append(DeadLetter(
                        "batch" if d.span else "message", d.msg.subject, d.msg.data,
                        d.reason or "invalid", d.msg.headers, d.span))
            good = [d for d in group if d.batch is not None]
            seen = await self._accounted(conn, [d.batch for d in good if d.batch])
            fresh = [d for i, d in enumerate(good) if i not in seen]
            rows: list[Row] = []
            owners: list[tuple[Decoded, int]] = []
            for d in fresh:
                b = d.batch
                assert b is not None
                for i, rec in enumerate(b.records):
                    if rec is not None and i not in d.bad:
                        rows.append(_row((b.edge, b.stream, b.epoch), b.first_seq + i, rec,
                                         received_us))
                        owners.append((d, i))
            inserted, rejected, partial = await self._insert_isolating(conn, rows)
            del rows
            for index, reason in rejected:
                d, i = owners[index]
                d.bad[i] = reason
            for d in good:
                assert d.batch is not None
                batches += 1
                records += len(d.batch.records)
            for d in fresh:
                b = d.batch
                assert b is not None
                ok = [b.first_seq + i for i in range(len(b.records)) if i not in d.bad]
                committed.extend(spans_of(b.edge, b.stream, b.epoch, ok))
                for i, reason in sorted(d.bad.items()):
                    seq = b.first_seq + i
                    letters.append(DeadLetter(
                        "record", d.msg.subject, _record_bytes(b, i), reason, None,
                        (b.edge, b.stream, b.epoch, seq, seq)))
                    log.warning("record_dead_lettered", edge=b.edge, stream=b.stream,
                                epoch=b.epoch, seq=seq, reason=reason)
            for w in await insert_dead_letters(conn, letters):
                wm[w[:3]] = w[3]
            for w in await merge_ranges(conn, "ranges", committed):
                wm[w[:3]] = w[3]
            # The feed gets the rows inserted now: all committed seqs, unless some were
            # duplicates (then exactly those the fallback reported inserting).
            await record_commit(conn, committed if partial is None else _spans(partial),
                                [(*k, v) for k, v in wm.items()])
        dead_records = sum(d.span[4] - d.span[3] + 1 for d in letters if d.span)
        return GroupResult(batches, records, inserted, len(letters), dead_records,
                           [(*k, v) for k, v in wm.items()])

    @staticmethod
    async def _accounted(conn: Connection, batches: Sequence[DecodedBatch]) -> set[int]:
        """Indexes of the batches whose whole seq range is already committed or
        dead-lettered (a redelivery: nothing to write)."""
        if not batches:
            return set()
        rows = await conn.fetch(
            "SELECT u.i - 1 AS i FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], "
            "$5::int8[]) WITH ORDINALITY AS u(edge_id, stream, epoch, lo, hi, i) "
            "JOIN committed_ranges c USING (edge_id, stream, epoch) "
            "WHERE (c.ranges + c.dead_lettered) @> int8range(u.lo, u.hi)",
            [b.edge for b in batches], [b.stream for b in batches],
            [b.epoch for b in batches], [b.first_seq for b in batches],
            [b.last_seq + 1 for b in batches],
        )
        return {r["i"] for r in rows}

    async def _insert_isolating(
        self, conn: Connection, rows: list[Row]
    ) -> tuple[int, list[tuple[int, str]], list[Key] | None]:
        """Insert ``rows``; rows PostgreSQL refuses are found by bisection and left out.

        Returns:
            Rows inserted, ``(row index, reason)`` of each refused row, and None when
            every row not refused was inserted, else the identities inserted.
        """
        rejected: list[tuple[int, str]] = []
        whole: list[tuple[int, int]] = []
        some: list[Key] = []
        partial = False

        async def attempt(lo: int, hi: int) -> int:
            nonlocal partial
            try:
                async with conn.transaction():  # savepoint: a refusal undoes only this part
                    n, keys = await self._insert(conn, rows[lo:hi])
            except REJECTED as exc:
                if hi - lo == 1:
                    rejected.append((lo, refusal(exc)))
                    return 0
                mid = (lo + hi) // 2
                return await attempt(lo, mid) + await attempt(mid, hi)
            if keys is None:
                whole.append((lo, hi))
            else:
                partial = True
                some.extend(keys)
            return n

        inserted = await attempt(0, len(rows)) if rows else 0
        if not partial:
            return inserted, rejected, None
        for lo, hi in whole:
            some.extend((r[0], r[1], r[2], r[3]) for r in rows[lo:hi])
        return inserted, rejected, some

    async def _insert(self, conn: Connection, rows: list[Row]) -> tuple[int, list[Key] | None]:
        """Insert rows, skipping identities already present.

        Returns:
            Rows inserted, and None when that is all of them (the COPY path), else
            the identities inserted.
        """
        try:
            async with conn.transaction():  # savepoint: a conflict must not doom the group
                await conn.copy_records_to_table("records", records=rows, columns=_COLUMNS)
            return len(rows), None
        except asyncpg.UniqueViolationError:
            pass
        await conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS records_stage "
            "(LIKE records INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        await conn.copy_records_to_table("records_stage", records=rows, columns=_COLUMNS)
        done = await conn.fetch(
            "INSERT INTO records SELECT * FROM records_stage ON CONFLICT DO NOTHING"
            " RETURNING edge_id, stream, epoch, seq"
        )
        await conn.execute("TRUNCATE records_stage")
        return len(done), [(r[0], r[1], r[2], r[3]) for r in done]


def _spans(keys: list[Key]) -> list[Span]:
    """Closed spans covering ``keys``, per (edge, stream, epoch) in seq order."""
    by_key: dict[tuple[str, str, int], list[int]] = {}
    for edge, stream, epoch, seq in keys:
        by_key.setdefault((edge, stream, epoch), []).append(seq)
    return [span for k, seqs in sorted(by_key.items())
            for span in spans_of(*k, sorted(set(seqs)))]


def _row(key: tuple[str, str, int], seq: int, rec: Record, received_us: int) -> Row:
    return (
        *key, seq, rec.ts, received_us, rec.key,
        _json.encode(rec.headers) if rec.headers else None,
        rec.payload if rec.ct == CT_JSON else None,
        None if rec.ct == CT_JSON else rec.payload,
    )


def _record_bytes(batch: DecodedBatch, index: int) -> bytes:
    """The bytes of record ``index`` as it travelled (re-encoded when it decoded)."""
    rec = batch.records[index]
    if rec is not None:
        return _msgpack.encode(rec)
    for i, _, raw in batch.problems:
        if i == index:
            return raw
    return b""
