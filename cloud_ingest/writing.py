"""One fetched group of record batches -> one PostgreSQL transaction, bad records isolated.

:meth:`GroupWriter.decode` turns a message into a :class:`Decoded`: the batch's
envelope, each record decoded on its own and checked by the shared validator
(:mod:`broker.protocol.validation`). It never raises. The ingest asks it to leave the
syntax and UTF-8 of JSON payloads to PostgreSQL (``json_syntax=False``): the ``json``
column's input parses every payload the COPY sends anyway and refuses those, so
skimming them in Python first was the same work twice (~0.5 µs per record). What that
input lets through and the record contract does not (nesting past
``MAX_JSON_DEPTH``, ``\\u0000`` and lone surrogate escapes, numbers beyond
``numeric``: the views cast payloads to ``jsonb``) is still checked first.

:meth:`GroupWriter.write` then, in one transaction:

1. leaves out every record whose seq ``committed_ranges`` already accounts for
   (a redelivery), or an earlier batch of the group holds (overlapping
   retransmits). What is accounted is read only when the writer's last group
   found something accounted (or raced), at its first group, or when the group
   has records to dead-letter: after a clean group the next is most likely new
   records, and step 2's merge finds any redelivery all the same (then the
   group is redone with the read, under the lock);
2. binary COPYs the valid records' rows into ``records``, then merges their seqs
   into the keys' ``committed_ranges.ranges`` in one statement that locks every
   key's row (created when missing, in key order) and merges only where no
   concurrent transaction committed any of those seqs meanwhile
   (:func:`cloud_ingest.ranges.merge_committed`); if one did, undoes the COPY and
   redoes the step with the keys locked first (``accounting.accounted_seqs``).
   ``records`` has no unique index (it is partitioned by ``received_at``,
   migration 008): these locks are what keep rows exactly once. The first read
   returns only what is accounted within the seqs the group covers
   (``accounting.accounted_seqs`` says why that is enough);
3. if PostgreSQL rejects the data: when the group's JSON syntax was left to it,
   undoes the COPY, checks the group with the validator in full (each bad payload
   then has the validator's reason, as the bridge would give) and goes back to 2
   without them;
   otherwise (rules drift, a check the validator does not know) bisects the rows
   down to the records it rejects, so every good record commits and each bad one
   is isolated. A group with a bad JSON payload thus costs one refused COPY more,
   never a bisection per bad record;
4. writes a dead letter per bad record with its identity, reason and bytes
   (and per undecodable message) and merges their seqs into ``dead_lettered``;
5. adds the group's entry to the commit-ordered feed (:mod:`cloud_ingest.feeding`):
   the spans of the rows it inserted and the new watermarks;
6. returns the new watermarks, and the current ones of keys it only repeated
   (``GroupResult.repeated``: their edge may lack them); the caller commits, then
   acks.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import asyncpg
import msgspec
import structlog
from nats.aio.msg import Msg

from broker.errors import DecodeError
from broker.protocol.topology import Topology
from broker.protocol.validation import record_problems
from broker.protocol.wire import (
    CT_JSON,
    ENCODING_HEADER,
    Batch,
    DecodedBatch,
    Record,
    decode_records,
)
from cloud_ingest.accounting import SeqRuns, accounted_seqs, key_of, skips, windows_of
from cloud_ingest.copy_encoding import COPY_COLUMNS, CopyRows, KeyPieces
from cloud_ingest.db_errors import Connection
from cloud_ingest.dead_letters import DeadLetter, insert_dead_letters
from cloud_ingest.direct_delivery import header_of
from cloud_ingest.feeding import record_commit
from cloud_ingest.gc_pausing import paused_gc
from cloud_ingest.isolating import REJECTED, refusal
from cloud_ingest.key_limits import key_limit_reason, keys_over_limit
from cloud_ingest.ranges import Span, Watermark, merge_committed, spans_of, watermarks_of

__all__ = [
    "COLUMNS", "MAX_CACHED_STREAM_KEYS", "ROW_OVERHEAD_BYTES", "VALIDATE_CHUNK_RECORDS",
    "Decoded", "GroupResult", "GroupWriter", "Key", "Row", "StoredRow",
]

log = structlog.get_logger(__name__)

Row = tuple[str, str, int, int, int, int, str | None, bytes | None, bytes | None, bytes | None]
"""A record as a row, its key spelled out: ``(edge, stream, epoch, seq, event_time,
received_at, key, headers, payload, payload_raw)`` (:meth:`GroupWriter.rows`)."""
StoredRow = tuple[int, int, int, int, str | None, bytes | None, bytes | None, bytes | None]
"""A row as ``records`` stores it (:data:`COLUMNS`): the key is a ``stream_keys`` id."""
Key = tuple[str, str, int, int]
"""A record's identity: ``(edge, stream, epoch, seq)``."""
COLUMNS = (
    "seq", "event_time", "received_at", "stream_key", "key", "headers", "payload",
    "payload_raw",
)
"""The columns of ``records`` the writer fills (migration 010), in :data:`StoredRow`'s
order: ``(edge, stream, epoch)`` is one ``stream_keys`` id."""
MAX_CACHED_STREAM_KEYS = 100_000
"""``(edge, stream, epoch)`` ids a writer remembers: a fleet's keys (10,000 edges with a
few streams each) fit; past it the cache is trimmed to the keys of the call at hand."""
VALIDATE_CHUNK_RECORDS = 1_000
"""Records :meth:`GroupWriter.validate` checks in one call, at least (whole batches)."""
ROW_OVERHEAD_BYTES = 400
"""Python memory one decoded record costs besides its payload (Record, row tuple,
ints): measured ~300 B; used to budget the records a worker holds at once."""
_json = msgspec.json.Encoder()
_msgpack = msgspec.msgpack.Encoder()


class Decoded(msgspec.Struct):
    """A message as far as it decodes (a msgspec struct: one is made per message, a
    fleet's 10-record batch, and a dataclass's ``__init__`` cost three times as much)."""

    msg: Msg
    batch: DecodedBatch | None
    reason: str | None = None
    """Why the message as a whole cannot be written (``batch`` is None then)."""
    span: Span | None = None
    """The seqs a message-level failure accounts for, when its identity is trusted."""
    cost: int = 0
    """Estimated bytes of memory this decoded message holds."""
    bad: dict[int, str] = msgspec.field(default_factory=dict)
    """Record index -> reason, for records that must be dead-lettered."""
    checked: bool = False
    """Its records were validated (``bad`` is complete, but see ``syntax_checked``)."""
    syntax_checked: bool = True
    """The syntax and UTF-8 of its JSON payloads were checked too; False: left to
    PostgreSQL (``bad`` lacks such refusals until :meth:`GroupWriter.write` meets one)."""
    bare: bool = False
    """Its dead letter is written without the message's headers (a last resort, when
    the letter could not be written with them)."""


@dataclass(frozen=True, slots=True)
class GroupResult:
    batches: int
    records: int
    inserted: int
    dead_letters: int
    dead_lettered_records: int
    watermarks: list[Watermark]
    """``(edge, stream, epoch, watermark)`` after this commit, per key touched."""
    repeated: list[Watermark] = field(default_factory=list)
    """The watermarks of keys this group changed nothing in because all it carried of
    them was accounted already: a JetStream redelivery, or an edge's retransmit. An
    edge retransmits when it has not seen the watermark covering what it shipped (a
    watermark write lost, an ingest that stopped between its commit and the write),
    so these are written again, even if written before: without that, a stream that
    then goes quiet would keep its last batch unacknowledged, retransmitted for ever."""
    keys_refused: int = 0
    """Messages dead-lettered because they named a key past the edge's bound
    (:mod:`cloud_ingest.key_limits`); counted in ``dead_letters`` too."""


class GroupWriter:
    """Writes one fetched group in one transaction (see module docstring)."""

    def __init__(self, topology: Topology, *, max_keys_per_edge: int | None = None) -> None:
        """``max_keys_per_edge``: the bound of :mod:`cloud_ingest.key_limits` (None: none)."""
        self.topology = topology
        self.max_keys_per_edge = max_keys_per_edge
        self.keys_refused = 0
        """Messages dead-lettered because they named a key past ``max_keys_per_edge``."""
        self._days: set[date] = set()
        """Days whose ``records`` partition this writer has seen exist."""
        self._key_pieces = KeyPieces()
        """Record key -> its COPY piece, kept across groups (:mod:`copy_encoding`)."""
        self._read_first = True
        """Whether :meth:`write` reads what a group's keys account before its COPY: true
        from the start (a restarted ingest meets redeliveries) and after a group that
        found something accounted or raced; false after a clean group."""
        self._keys: dict[tuple[str, str, int], int] = {}
        """``(edge, stream, epoch)`` -> its ``stream_keys`` id (committed ones only; at
        most :data:`MAX_CACHED_STREAM_KEYS`)."""

    async def stream_keys(self, conn: Connection, keys: Iterable[tuple[str, str, int]]
                          ) -> dict[tuple[str, str, int], int]:
        """The ``stream_keys`` ids of ``keys``, added when new.

        Ids are cached only when resolved outside a transaction (committed for good):
        an id added by a transaction that rolls back is gone, and a row written with
        it would be an orphan no view shows. Inside one (tests, a caller's own
        transaction) they are looked up every time.
        """
        known = self._keys
        wanted = keys if isinstance(keys, set | frozenset) else set(keys)
        if not (missing := sorted(wanted - known.keys())):
            return known
        found = await _stream_key_ids(conn, missing)
        if conn.is_in_transaction():
            return {**known, **found}
        if len(known) + len(found) > MAX_CACHED_STREAM_KEYS:
            # Epochs come from the edges' batches: a misbehaving edge can invent many.
            # The cache keeps what this call needs and forgets the rest (looked up again).
            kept = {k: known[k] for k in wanted if k in known}
            known.clear()
            known.update(kept)
        known.update(found)
        return known

    def decode(self, msg: Msg, *, validate: bool = True, json_syntax: bool = True) -> Decoded:
        """Decode and validate ``msg``; never raises. With ``validate=False`` the records
        of a batch smaller than :data:`VALIDATE_CHUNK_RECORDS` are not checked yet:
        :meth:`validate` then checks a whole part's at once. With ``json_syntax=False``
        JSON syntax and UTF-8 are left to PostgreSQL (the module docstring says why).
        A batch that size or bigger is its own chunk anyway, and is checked now, while
        its records are still in the CPU's cache (checked after the whole part was
        decoded, each pass over a 16,000-record part's columns missed the cache: py-spy
        of issue 12's bench)."""
        route = self.topology.parse_records_subject(msg.subject)
        try:
            # Only the encoding header matters to decoding (header_of: no parse for it).
            encoding = header_of(msg, ENCODING_HEADER)
            batch = decode_records(msg.data,
                                   None if encoding is None else {ENCODING_HEADER: encoding})
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
        cost = batch.body_bytes + len(batch.records) * ROW_OVERHEAD_BYTES
        decoded = Decoded(msg, batch, None, batch.span, cost, bad)
        if validate or len(batch.records) >= VALIDATE_CHUNK_RECORDS:
            _validate_chunk([decoded], json_syntax=json_syntax)
            decoded.checked = True
            decoded.syntax_checked = json_syntax
        return decoded

    @staticmethod
    def validate(group: Sequence[Decoded], *, json_syntax: bool = True) -> None:
        """Check the records of ``group``'s batches (decoded with ``validate=False``);
        each record that cannot be stored joins its batch's ``bad``. ``json_syntax``: as
        :meth:`decode`'s.

        The records of consecutive batches are checked together, at least
        :data:`VALIDATE_CHUNK_RECORDS` at a time (record_problems: a few passes over
        their JSON payloads joined, as the bridge checks a request, instead of a parse
        of each; with ``json_syntax=False`` those passes skip the syntax skim): a
        fleet's 10-record batches then cost what one edge's big batch does, not a call
        each (measured: validation twice as dear per record in a fan-in drain as in a
        bulk one). A payload the joined passes refuse sends its chunk's JSON records to
        a check each, as it did its batch's before: the chunk is as big as one edge's
        batch, so a bad record costs no more than it did."""
        _validate_chunks([d for d in group if d.batch is not None and not d.checked],
                         json_syntax=json_syntax)
        for d in group:
            if not d.checked:
                d.checked = True
                d.syntax_checked = json_syntax

    @staticmethod
    def rows(batch: Batch, received_us: int) -> list[Row]:
        """The rows of a whole (valid) batch, their key spelled out (:meth:`_insert`
        stores them)."""
        key = (batch.edge, batch.stream, batch.epoch)
        return [(*key, *_named(_row(0, batch.first_seq + i, rec, received_us)))
                for i, rec in enumerate(batch.records)]

    async def write(self, conn: Connection, group: Sequence[Decoded]) -> GroupResult:
        """Write a decoded group in one transaction; raises on database failure."""
        received_us = time.time_ns() // 1000
        day = datetime.fromtimestamp(received_us // 1_000_000, UTC).date()
        if day not in self._days:
            # The ingest creates partitions days ahead; this only checks (and, if the
            # ingest is late, creates) once a day, in a short transaction of its own.
            if created := await conn.fetchval("SELECT es_records_partition($1)", day):
                log.warning("records_partition_created_late", partition=created)
            self._days = {day}
        refused_before = self.keys_refused
        # The group's keys as a set, built once: a fleet's group names a thousand, and
        # building the set twice and copying it once more cost ~1.4 µs a batch
        # (python -m bench.ingest_cpu, seven alternating pairs).
        named = {key_of(d.batch) for d in group if d.batch is not None}
        group, named = await self._within_key_limit(conn, group, named)
        refs = await self.stream_keys(conn, named)
        letters: list[DeadLetter] = []
        committed: list[Span] = []
        batches = records = inserted = 0
        wm: dict[tuple[str, str, int], int] = {}
        async with conn.transaction():
            for d in group:
                if d.batch is None:
                    letters.append(DeadLetter(
                        "batch" if d.span else "message", d.msg.subject, d.msg.data,
                        d.reason or "invalid", None if d.bare else d.msg.headers, d.span))
            good = [d for d in group if d.batch is not None]
            windows = windows_of(good, letters)
            keys = sorted(windows)
            # Optimistic: COPY what is not accounted yet as far as known, then merge it
            # into the keys' rows under their locks only where no other commit took some
            # of those seqs meanwhile (a redelivery racing the first delivery). If one
            # did, undo and redo under the lock. Concurrent groups of one key thus COPY
            # in parallel. What is accounted is read first (without locking) unless the
            # writer's last group found nothing accounted: then this one most likely
            # holds no redelivery either, and the merge's check is the only read.
            # The read is also needed for records to dead-letter: the merge checks only
            # the seqs it commits, so whether a letter was written before is its to say.
            syntax_unchecked = [d for d in good if not d.syntax_checked]
            seen: dict[tuple[str, str, int], SeqRuns] = {}
            found: frozenset[tuple[str, str, int]] = frozenset()
            read = locked = False
            while True:
                if not read and (self._read_first or any(d.bad for d in good)):
                    read = True
                    seen = await accounted_seqs(conn, keys, windows, lock=False)
                    found = frozenset(seen)
                if locked:
                    seen = await accounted_seqs(conn, keys, windows, lock=True,
                                                 existing=found)
                skip = skips(good, seen)
                rows = CopyRows(received_us, self._key_pieces)
                placed: list[tuple[int, list[int] | None]] = []
                """Per batch of ``good``: where its rows start in ``rows``, and the indexes
                of its records they hold (None: all of them, in order)."""
                spans: list[Span] = []
                # No await in this loop: the cyclic GC is paused while it allocates a
                # group's rows (:mod:`cloud_ingest.gc_pausing`).
                with paused_gc():
                    for j, d in enumerate(good):
                        b = d.batch
                        assert b is not None
                        key = (b.edge, b.stream, b.epoch)
                        ref = refs[key]
                        first = b.first_seq
                        if not d.bad and not skip[j] and not b.problems:
                            # The common case: every record of the batch goes in (an
                            # undecodable record is None, with a problem, and in ``bad``).
                            placed.append((len(rows), None))
                            rows.add(ref, first, b.records)  # type: ignore[arg-type]
                            spans.append((*key, first, first + len(b.records) - 1))
                            continue
                        ok: list[int] = []
                        placed.append((len(rows), ok))
                        for i, rec in enumerate(b.records):
                            if rec is not None and i not in d.bad and i not in skip[j]:
                                rows.add_one(ref, first + i, rec)
                                ok.append(i)
                        spans.extend(spans_of(*key, [first + i for i in ok]))
                try:
                    async with conn.transaction():  # savepoint: undone if raced
                        inserted, rejected = await self._insert_isolating(
                            conn, rows, bisect=not syntax_unchecked)
                        committed = (spans if not rejected else
                                     _committed(good, placed, rejected, skip))
                        if rejected and not read:
                            raise _Unread  # records to dead-letter: read first (above)
                        # Locks every key, checks no concurrent commit took a seq of
                        # ``committed`` since ``seen`` was read, and merges them.
                        merged = await merge_committed(conn, keys, committed)
                        if merged is None:
                            if locked:  # nothing can commit those seqs while locked
                                raise RuntimeError(
                                    "committed_ranges changed under this group's locks")
                            raise _Raced
                except _Raced:
                    log.info("group_raced_redelivery", keys=len(keys), read_first=read)
                    locked = True
                    continue
                except _Refused as exc:
                    # Likely a payload that is not JSON: the validator names each with
                    # its reason, and the COPY is tried again without them.
                    log.info("group_checked_after_refusal", batches=len(syntax_unchecked),
                             error=refusal(exc.__cause__ or exc))
                    _check_in_full(syntax_unchecked)
                    syntax_unchecked = []
                    continue
                except _Unread:
                    continue
                break
            self._read_first = locked or any(skip)
            max_record_bytes = rows.max_record_bytes  # of every row tried: a bound
            del rows
            for w in merged:
                wm[w[:3]] = w[3]
            # Keys of which the group stored nothing new (GroupResult.repeated).
            again = {key_of(d.batch) for j, d in enumerate(good)
                     if skip[j] and d.batch is not None}
            repeated = await watermarks_of(conn, sorted(again - wm.keys()))
            for j, d in enumerate(good):
                b = d.batch
                assert b is not None
                batches += 1
                records += len(b.records)
                for i, reason in sorted(d.bad.items()):
                    if i in skip[j]:
                        continue  # accounted already (a redelivery): its letter exists
                    seq = b.first_seq + i
                    letters.append(DeadLetter(
                        "record", d.msg.subject, _record_bytes(b, i), reason, None,
                        (b.edge, b.stream, b.epoch, seq, seq)))
                    log.warning("record_dead_lettered", edge=b.edge, stream=b.stream,
                                epoch=b.epoch, seq=seq, reason=reason)
            for w in await insert_dead_letters(conn, letters):
                wm[w[:3]] = w[3]  # after the merge's: it counts both
            # The feed gets exactly the rows inserted now (never a seq accounted before).
            await record_commit(conn, committed, [(*k, v) for k, v in wm.items()],
                                received_us=received_us if committed else None,
                                max_record_bytes=max_record_bytes)
        dead_records = sum(d.span[4] - d.span[3] + 1 for d in letters if d.span)
        return GroupResult(batches, records, inserted, len(letters), dead_records,
                           [(*k, v) for k, v in wm.items()],
                           [w for w in repeated if w[:3] not in wm],
                           self.keys_refused - refused_before)

    async def _within_key_limit(
        self, conn: Connection, group: Sequence[Decoded], named: set[tuple[str, str, int]]
    ) -> tuple[Sequence[Decoded], set[tuple[str, str, int]]]:
        """``group`` (whose batches name the keys ``named``) with each batch that names a
        key past ``max_keys_per_edge`` turned into a message-level dead letter (no seq
        accounted: that would make the key's row), and the keys its batches then name.
        Asks PostgreSQL only about keys this writer does not know."""
        limit = self.max_keys_per_edge
        if limit is None:
            return group, named
        new = named - self._keys.keys()
        if not new or not (refused := await keys_over_limit(conn, new, limit)):
            return group, named
        out: list[Decoded] = []
        for d in group:
            if d.batch is None or (key := key_of(d.batch)) not in refused:
                out.append(d)
                continue
            self.keys_refused += 1
            log.warning("edge_key_limit_reached", edge=key[0], stream=key[1], epoch=key[2],
                        limit=limit)
            out.append(Decoded(d.msg, None, key_limit_reason(key, limit), None, d.cost))
        return out, named - refused

    async def _insert_isolating(
        self, conn: Connection, rows: CopyRows, *, bisect: bool = True
    ) -> tuple[int, list[tuple[int, str]]]:
        """Insert ``rows``; rows PostgreSQL refuses are found by bisection and left out.

        Returns:
            Rows inserted, and ``(row index, reason)`` of each refused row.

        Raises:
            _Refused: with ``bisect=False``, when PostgreSQL refuses the rows (their
                COPY undone).
        """
        if not rows:
            return 0, []
        if not bisect:
            try:
                async with conn.transaction():  # savepoint: a refusal undoes the COPY
                    await _copy_rows(conn, rows, 0, len(rows))
            except REJECTED as exc:
                raise _Refused from exc
            return len(rows), []
        rejected: list[tuple[int, str]] = []
        inserted = await _attempt(conn, rows, 0, len(rows), rejected)
        return inserted, rejected


    async def _insert(self, conn: Connection, rows: list[Row]) -> tuple[int, None]:
        """Insert ``rows`` (no de-duplication: the caller holds the keys' locks)."""
        refs = await self.stream_keys(conn, {r[:3] for r in rows})
        await _copy(conn, [(r[3], r[4], r[5], refs[r[:3]], *r[6:]) for r in rows])
        return len(rows), None


_STREAM_KEYS_SQL = (
    "WITH u AS (SELECT * FROM unnest($1::text[], $2::text[], $3::int8[]) AS u(e, s, ep)), "
    "known AS (SELECT k.edge_id, k.stream, k.epoch, k.id FROM u JOIN stream_keys k "
    "  ON (k.edge_id, k.stream, k.epoch) = (u.e, u.s, u.ep)), "
    "added AS (INSERT INTO stream_keys (edge_id, stream, epoch) "
    "  SELECT u.e, u.s, u.ep FROM u LEFT JOIN known "
    "    ON (known.edge_id, known.stream, known.epoch) = (u.e, u.s, u.ep) "
    "  WHERE known.id IS NULL ORDER BY 1, 2, 3 "
    "  ON CONFLICT DO NOTHING RETURNING edge_id, stream, epoch, id) "
    "SELECT * FROM known UNION ALL SELECT * FROM added"
)
"""The ids of the keys ``$1``-``$3`` (distinct), the missing ones added, as one
statement: a fleet's first group names thousands of new keys, and ``es_stream_key``
per key (a PL/pgSQL call, a read and an insert each) cost ~35 µs of PostgreSQL time
a key. A key another transaction adds meanwhile is in neither part (its row is not in
this statement's snapshot, and the insert skips it); :func:`_stream_key_ids` asks
``es_stream_key`` for those."""


async def _stream_key_ids(conn: Connection, keys: Sequence[tuple[str, str, int]]
                          ) -> dict[tuple[str, str, int], int]:
    """The ``stream_keys`` ids of ``keys`` (distinct), added when new."""
    columns = ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys])
    rows = await conn.fetch(_STREAM_KEYS_SQL, *columns)
    found = {(r[0], r[1], r[2]): r[3] for r in rows}
    if late := [k for k in keys if k not in found]:  # added concurrently (docstring)
        rows = await conn.fetch(
            "SELECT u.e, u.s, u.ep, es_stream_key(u.e, u.s, u.ep) FROM unnest($1::text[], "
            "$2::text[], $3::int8[]) AS u(e, s, ep) ORDER BY 1, 2, 3",
            [k[0] for k in late], [k[1] for k in late], [k[2] for k in late])
        found.update({(r[0], r[1], r[2]): r[3] for r in rows})
    return found


async def _attempt(conn: Connection, rows: CopyRows, lo: int, hi: int,
                   rejected: list[tuple[int, str]]) -> int:
    """COPY ``rows[lo:hi]``; on a refusal, bisect (:meth:`GroupWriter._insert_isolating`).

    A module function, not a closure: a closure that calls itself is a reference cycle
    (function -> cell -> function) holding ``rows`` with it, so a group's rows (payloads
    included) stayed alive until the cyclic GC next ran, a whole group's worth of
    objects for it to scan (found in issue 12's profile)."""
    try:
        async with conn.transaction():  # savepoint: a refusal undoes only this part
            await _copy_rows(conn, rows, lo, hi)
    except REJECTED as exc:
        if hi - lo == 1:
            rejected.append((lo, refusal(exc)))
            return 0
        mid = (lo + hi) // 2
        return (await _attempt(conn, rows, lo, mid, rejected)
                + await _attempt(conn, rows, mid, hi, rejected))
    return hi - lo


def _check_in_full(batches: Sequence[Decoded]) -> None:
    """Check ``batches`` (validated with ``json_syntax=False``) again, JSON syntax
    included: each refusal joins its batch's ``bad`` (those found before, again)."""
    _validate_chunks([d for d in batches if d.batch is not None], json_syntax=True)
    for d in batches:
        d.syntax_checked = True


def _validate_chunks(batches: Sequence[Decoded], *, json_syntax: bool) -> None:
    """Check the records of ``batches`` (all decoded), consecutive batches together in
    chunks of at least :data:`VALIDATE_CHUNK_RECORDS` records."""
    chunk: list[Decoded] = []
    size = 0
    for d in batches:
        assert d.batch is not None
        chunk.append(d)
        size += len(d.batch.records)
        if size >= VALIDATE_CHUNK_RECORDS:
            _validate_chunk(chunk, json_syntax=json_syntax)
            chunk, size = [], 0
    if chunk:
        _validate_chunk(chunk, json_syntax=json_syntax)


def _validate_chunk(chunk: Sequence[Decoded], *, json_syntax: bool = True) -> None:
    """:meth:`GroupWriter.validate` of consecutive batches, their records in one call."""
    present: list[Record] = []
    starts: list[int] = []
    for d in chunk:
        b = d.batch
        assert b is not None
        starts.append(len(present))
        if b.problems:
            present.extend(rec for rec in b.records if rec is not None)
        else:
            present.extend(b.records)  # type: ignore[arg-type]  # no None without problems
    decodable: dict[int, list[int]] = {}  # per batch with undecodable records, built once
    plain = all(d.batch.plain for d in chunk)  # type: ignore[union-attr]  # all decoded
    for j, reason in record_problems(present, json_syntax=json_syntax, plain=plain):
        k = bisect.bisect_right(starts, j) - 1
        d = chunk[k]
        b = d.batch
        assert b is not None
        where = j - starts[k]
        if b.problems:  # the index among the batch's decodable records -> in the batch
            if (indexes := decodable.get(k)) is None:
                indexes = decodable[k] = [i for i, rec in enumerate(b.records) if rec is not None]
            where = indexes[where]
        d.bad[where] = reason


def _committed(good: Sequence[Decoded], placed: Sequence[tuple[int, list[int] | None]],
               rejected: Sequence[tuple[int, str]], skip: Sequence[frozenset[int]]
               ) -> list[Span]:
    """The spans of the rows a group inserted when PostgreSQL refused some of those it
    offered (``rejected``: row index, reason); each refused row joins its batch's
    ``bad``, to be dead-lettered with PostgreSQL's reason."""
    starts = [p[0] for p in placed]
    for index, reason in rejected:
        d, i = _owner(good, placed, starts, index)
        d.bad[i] = reason
    out: list[Span] = []
    for j, d in enumerate(good):
        b = d.batch
        assert b is not None
        ok = [b.first_seq + i for i in range(len(b.records))
              if i not in d.bad and i not in skip[j]]
        out.extend(spans_of(b.edge, b.stream, b.epoch, ok))
    return out


def _owner(good: Sequence[Decoded], placed: Sequence[tuple[int, list[int] | None]],
           starts: Sequence[int], index: int) -> tuple[Decoded, int]:
    """The batch (of ``good``) and record index of row ``index`` of a group's rows.

    ``starts`` are ``placed``'s starts: among batches with one start, only the last can
    hold rows (the others hold none), which is the one ``bisect_right`` finds."""
    j = bisect.bisect_right(starts, index) - 1
    start, indexes = placed[j]
    return good[j], index - start if indexes is None else indexes[index - start]


class _Raced(Exception):
    """A concurrent commit accounted some of the seqs a group just inserted."""


class _Unread(Exception):
    """A group written without reading what its keys account has records to
    dead-letter after all: it is redone with that read."""


class _Refused(Exception):
    """PostgreSQL refused a group's rows while their JSON syntax was unchecked."""


_NO_PARTITION = "no partition of relation"


async def _copy(conn: Connection, rows: list[StoredRow]) -> None:
    """Binary COPY ``rows`` into ``records``; a day without a partition yet (the
    ingest creates them ahead, so only when that is late) gets one and is retried."""
    try:
        async with conn.transaction():
            await conn.copy_records_to_table("records", records=rows, columns=COLUMNS)
        return
    except asyncpg.CheckViolationError as exc:
        if _NO_PARTITION not in str(exc):
            raise
    for day in sorted({datetime.fromtimestamp(r[2] // 1_000_000, UTC).date() for r in rows}):
        created = await conn.fetchval("SELECT es_records_partition($1)", day)
        if created:
            log.warning("records_partition_created_late", partition=created)
    await conn.copy_records_to_table("records", records=rows, columns=COLUMNS)


async def _copy_rows(conn: Connection, rows: CopyRows, lo: int, hi: int) -> None:
    """Binary COPY rows ``lo`` to ``hi`` of ``rows`` (one pass, :mod:`copy_encoding`);
    a day without a partition yet gets one and the COPY is retried, as in :func:`_copy`."""
    try:
        async with conn.transaction():
            await conn.copy_to_table("records", source=_sent(rows, lo, hi),
                                     columns=COPY_COLUMNS, format="binary")
        return
    except asyncpg.CheckViolationError as exc:
        if _NO_PARTITION not in str(exc):
            raise
    day = datetime.fromtimestamp(rows.received_us // 1_000_000, UTC).date()
    created = await conn.fetchval("SELECT es_records_partition($1)", day)
    if created:
        log.warning("records_partition_created_late", partition=created)
    await conn.copy_to_table("records", source=_sent(rows, lo, hi), columns=COPY_COLUMNS,
                             format="binary")


async def _sent(rows: CopyRows, lo: int, hi: int) -> AsyncIterator[bytes]:
    """Rows ``lo`` to ``hi`` as the async iterable asyncpg's ``copy_to_table`` reads,
    chunk by chunk (:meth:`CopyRows.chunks`)."""
    for chunk in rows.chunks(lo, hi):
        yield chunk


def _row(ref: int, seq: int, rec: Record, received_us: int) -> StoredRow:
    """The stored row: the payload's JSON text as the producer sent it (``json``)."""
    return (
        seq, rec.ts, received_us, ref, rec.key,
        _json.encode(rec.headers) if rec.headers else None,
        rec.payload if rec.ct == CT_JSON else None,
        None if rec.ct == CT_JSON else rec.payload,
    )


def _named(row: StoredRow) -> tuple[int, int, int, str | None, bytes | None, bytes | None,
                                    bytes | None]:
    """``row`` without its key id: the tail of a :data:`Row`."""
    return (row[0], row[1], row[2], *row[4:])


def _record_bytes(batch: DecodedBatch, index: int) -> bytes:
    """The bytes of record ``index`` as it travelled (re-encoded when it decoded)."""
    rec = batch.records[index]
    if rec is not None:
        return _msgpack.encode(rec)
    for i, _, raw in batch.problems:
        if i == index:
            return raw
    return b""
