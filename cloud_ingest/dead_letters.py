"""Dead letters: what the cloud could not store, kept with its reason, and replayed.

The one module that writes, reads and replays ``dead_letters`` rows (the API
routes and ``edgesync dead-letters`` are thin wrappers around it). A dead
letter is one of (migration 004):

- ``record``: one record, with its identity ``(edge, stream, epoch, seq)``;
  ``data`` is the record's MessagePack encoding (as in a batch);
- ``batch``: a whole batch whose envelope named a valid identity range but
  which could not be decoded record by record (over a cap, a broken record
  array, or an ingest failure that kept recurring on it);
- ``message``: bytes with no readable identity (garbage, a spoofed subject);
- ``event``: an event the events consumer could not store.

The seqs of ``record`` and ``batch`` letters are merged into
``committed_ranges.dead_lettered`` in the same transaction, so the watermark
passes them and the edge trims them: accounted, never stalled.

**Replay** writes a record (or every valid record of a batch) into
``records`` with its original identity, moves its seqs from ``dead_lettered``
to ``ranges`` and stamps ``replayed_at``, in one transaction: a replay lands
a record exactly once, and a second replay finds it already there.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import asyncpg
import msgspec
import structlog
from fastapi import APIRouter, Query
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response

from broker.errors import DecodeError
from broker.protocol.validation import record_problem
from broker.protocol.wire import CT_JSON, Record, decode_records
from cloud_ingest.db_errors import Connection
from cloud_ingest.feeding import record_commit
from cloud_ingest.isolating import REFUSED_BY_POSTGRES
from cloud_ingest.ranges import Span, Watermark, merge_ranges, spans_of
from cloud_ingest.strict_json import StrictJsonRoute

__all__ = [
    "DeadLetter",
    "Kind",
    "NotReplayable",
    "ReplayResult",
    "dead_letter_routes",
    "get_dead_letter",
    "insert_dead_letters",
    "list_dead_letters",
    "replay_dead_letter",
]

log = structlog.get_logger(__name__)

Kind = Literal["record", "batch", "message", "event"]
_json = msgspec.json.Encoder()
_record_decoder = msgspec.msgpack.Decoder(Record)
_LIST_COLUMNS: Final = (
    "id, kind, subject, edge_id, stream, epoch, seq, last_seq, reason, received_at, "
    "replayed_at, length(data) AS size"
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One row to write into ``dead_letters``."""

    kind: Kind
    subject: str
    data: bytes
    reason: str
    headers: Mapping[str, str] | None = None
    span: Span | None = None
    """``(edge, stream, epoch, first_seq, last_seq)`` for ``record`` and ``batch``."""


async def insert_dead_letters(conn: Connection, letters: Sequence[DeadLetter]) -> list[Watermark]:
    """Write ``letters`` (a redelivered identity is written once) and account their
    seqs as dead-lettered; returns the watermarks after that. Call inside the
    transaction that also writes (or skips) the records around them."""
    if not letters:
        return []
    await conn.executemany(
        "INSERT INTO dead_letters (kind, subject, headers, data, reason, edge_id, stream, epoch, "
        "seq, last_seq) VALUES ($1, $2, $3::text::jsonb, $4, $5, $6, $7, $8, $9, $10) "
        "ON CONFLICT (edge_id, stream, epoch, seq, last_seq) WHERE seq IS NOT NULL DO NOTHING",
        [
            (d.kind, _storable_text(d.subject),
             _json.encode({_storable_text(k): _storable_text(v) for k, v in d.headers.items()}
                          ).decode() if d.headers else None,
             d.data, _storable_text(d.reason),
             *(d.span if d.span else (None, None, None, None, None)))
            for d in letters
        ],
    )
    return await merge_ranges(conn, "dead_lettered", [d.span for d in letters if d.span])


def _storable_text(text: str) -> str:
    """``text`` as PostgreSQL ``text`` (and ``jsonb``) can hold it: a NUL, and a lone
    surrogate (from bytes that were not UTF-8), written as their escapes (``\\x00``,
    ``\\udcff``). A dead letter's subject and headers are the sender's: an edge may put
    a NUL into either, and the letter must still be written (else its message could
    never be acked)."""
    if text.isascii() and "\x00" not in text:
        return text
    return text.encode("utf-8", "backslashreplace").decode().replace("\x00", "\\x00")


async def list_dead_letters(
    conn: Connection,
    *,
    edge: str | None = None,
    stream: str | None = None,
    kind: str | None = None,
    pending_only: bool = False,
    limit: int = 100,
    before_id: int | None = None,
) -> list[dict[str, Any]]:
    """Dead letters, newest first, without their bytes."""
    rows = await conn.fetch(
        f"SELECT {_LIST_COLUMNS} FROM dead_letters "
        "WHERE ($1::text IS NULL OR edge_id = $1) AND ($2::text IS NULL OR stream = $2) "
        "AND ($3::text IS NULL OR kind = $3) AND (NOT $4 OR replayed_at IS NULL) "
        "AND ($5::int8 IS NULL OR id < $5) ORDER BY id DESC LIMIT $6",
        edge, stream, kind, pending_only, before_id, limit,
    )
    return [_summary(r) for r in rows]


async def get_dead_letter(conn: Connection, letter_id: int) -> dict[str, Any] | None:
    """One dead letter with its bytes (``data``, base64 in JSON) and, for a record,
    the record decoded as far as it decodes."""
    row = await conn.fetchrow(
        f"SELECT {_LIST_COLUMNS}, data, headers::text AS headers FROM dead_letters WHERE id = $1",
        letter_id,
    )
    if row is None:
        return None
    out = _summary(row)
    out["data"] = bytes(row["data"])
    out["headers"] = msgspec.json.decode(row["headers"]) if row["headers"] else None
    if row["kind"] == "record":
        try:
            rec = _record_decoder.decode(row["data"])
            out["record"] = {
                "ts": rec.ts, "ct": rec.ct, "key": rec.key, "headers": rec.headers,
                "payload": rec.payload.decode("utf-8", "replace") if rec.ct == CT_JSON
                else None,
            }
        except msgspec.DecodeError:
            out["record"] = None
    return out


class NotReplayable(Exception):
    """This dead letter cannot be replayed (as it stands); ``str(exc)`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class ReplayResult:
    id: int
    inserted: int
    """Rows written now (0 when a previous replay or delivery already stored them)."""
    already_replayed: bool
    watermarks: list[Watermark]


async def replay_dead_letter(conn: Connection, letter_id: int) -> ReplayResult:
    """Write a dead-lettered record (or batch) into ``records`` with its identity.

    Raises:
        NotReplayable: unknown id (``unknown_dead_letter``), a letter without
            identity (``no_identity``), or one that still fails the validator or
            PostgreSQL (``still_invalid``, with the reason).
    """
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT id, kind, subject, headers::text AS headers, data, edge_id, stream, epoch, "
            "seq, last_seq, replayed_at FROM dead_letters WHERE id = $1 FOR UPDATE",
            letter_id,
        )
        if row is None:
            raise NotReplayable("unknown_dead_letter", f"no dead letter {letter_id}")
        if row["replayed_at"] is not None:
            return ReplayResult(letter_id, 0, True, [])
        if row["kind"] not in ("record", "batch"):
            raise NotReplayable(
                "no_identity", f"a {row['kind']} dead letter has no record identity to replay "
                "(inspect it with `show`; the producer must send it again)")
        edge, stream, epoch = row["edge_id"], row["stream"], row["epoch"]
        records = _records_of(row)
        problems = [(seq, p) for seq, rec in records if (p := record_problem(rec))]
        if problems:
            seq, problem = problems[0]
            raise NotReplayable("still_invalid", f"seq {seq}: {problem}")
        # The key's committed_ranges row, locked: what is committed already is skipped
        # (records has no unique index; cloud_ingest.writing explains why).
        await conn.execute(
            "INSERT INTO committed_ranges (edge_id, stream, epoch, ranges) "
            "VALUES ($1, $2, $3, '{}') ON CONFLICT (edge_id, stream, epoch) DO NOTHING",
            edge, stream, epoch)
        committed = await conn.fetchval(
            "SELECT ranges FROM committed_ranges WHERE (edge_id, stream, epoch) = ($1, $2, $3) "
            "FOR UPDATE", edge, stream, epoch)
        fresh = [(s, r) for s, r in records
                 if not any(x.lower <= s < x.upper for x in committed)]
        received_us = time.time_ns() // 1000
        # The ingest keeps partitions ahead; an API replaying while no ingest ran for
        # days must not call the record invalid for want of one.
        await conn.fetchval("SELECT es_records_partition($1)",
                            datetime.fromtimestamp(received_us // 1_000_000, UTC).date())
        try:
            async with conn.transaction():
                done = await conn.fetch(
                    "INSERT INTO records (stream_key, seq, event_time, received_at, "
                    "key, headers, payload, payload_raw) "
                    "SELECT es_stream_key($1, $2, $3), u.seq, "
                    "  to_timestamp(0) + make_interval(days => (u.ts / 86400000000)::int, "
                    "    secs => ((u.ts % 86400000000) / 1e6)::float8), "
                    "  'epoch'::timestamptz + $10::int8 * interval '1 microsecond', u.key, "
                    "  u.headers::json, "
                    "  CASE WHEN u.ct = 1 THEN convert_from(u.payload, 'UTF8')::json END, "
                    "  CASE WHEN u.ct = 1 THEN NULL ELSE u.payload END "
                    "FROM unnest($4::int8[], $5::int8[], $6::int2[], $7::bytea[], $8::text[], "
                    "  $9::text[]) AS u(seq, ts, ct, payload, key, headers) "
                    "RETURNING seq",
                    edge, stream, epoch,
                    [s for s, _ in fresh], [r.ts for _, r in fresh],
                    [r.ct for _, r in fresh], [r.payload for _, r in fresh],
                    [r.key for _, r in fresh],
                    [_json.encode(r.headers).decode() if r.headers else None
                     for _, r in fresh], received_us,
                )
        except REFUSED_BY_POSTGRES as exc:
            raise NotReplayable(
                "still_invalid", f"rejected by PostgreSQL: {type(exc).__name__}: {exc}"
            ) from exc
        spans = spans_of(edge, stream, epoch, [s for s, _ in records])
        await conn.execute(
            "UPDATE committed_ranges c SET dead_lettered = c.dead_lettered - "
            "  (SELECT range_agg(int8range(lo, hi + 1)) FROM unnest($4::int8[], $5::int8[]) "
            "   AS u(lo, hi)), updated_at = now() "
            "WHERE (edge_id, stream, epoch) = ($1, $2, $3)",
            edge, stream, epoch, [s[3] for s in spans], [s[4] for s in spans],
        )
        watermarks = await merge_ranges(conn, "ranges", spans)
        await conn.execute(
            "UPDATE dead_letters SET replayed_at = now() WHERE id = $1", letter_id
        )
        await record_commit(conn, spans_of(edge, stream, epoch, sorted(r[0] for r in done)),
                            watermarks, received_us=received_us if done else None)
    inserted = len(done)
    log.info("dead_letter_replayed", id=letter_id, kind=row["kind"], edge=edge, stream=stream,
             epoch=epoch, seq=row["seq"], inserted=inserted)
    return ReplayResult(letter_id, inserted, False, watermarks)


def _records_of(row: asyncpg.Record) -> list[tuple[int, Record]]:
    """``(seq, record)`` of a record or batch dead letter."""
    if row["kind"] == "record":
        try:
            return [(row["seq"], _record_decoder.decode(row["data"]))]
        except msgspec.DecodeError as exc:
            raise NotReplayable("still_invalid", f"malformed record: {exc}") from exc
    headers = msgspec.json.decode(row["headers"]) if row["headers"] else None
    try:
        batch = decode_records(bytes(row["data"]), headers)
    except DecodeError as exc:
        raise NotReplayable("still_invalid", str(exc)) from exc
    if batch.problems:
        index, reason, _ = batch.problems[0]
        raise NotReplayable("still_invalid", f"seq {batch.first_seq + index}: {reason}")
    return [(batch.first_seq + i, r) for i, r in enumerate(batch.records) if r is not None]


def _summary(row: asyncpg.Record) -> dict[str, Any]:
    received: datetime = row["received_at"]
    replayed: datetime | None = row["replayed_at"]
    return {
        "id": row["id"], "kind": row["kind"], "subject": row["subject"],
        "edge": row["edge_id"], "stream": row["stream"], "epoch": row["epoch"],
        "epoch_str": None if row["epoch"] is None else str(row["epoch"]),
        "seq": row["seq"], "last_seq": row["last_seq"], "reason": row["reason"],
        "size": row["size"], "received_at": received, "replayed_at": replayed,
    }


def dead_letter_routes(
    pool: Callable[[], asyncpg.Pool], *, read: Any, write: Any
) -> APIRouter:
    """The operator API's dead-letter routes (mounted by :mod:`cloud_ingest.api`).

    Args:
        pool: returns the API's PostgreSQL pool.
        read: the dependency guarding reads; ``write``: the one guarding replays.
    """
    router = APIRouter(prefix="/v1/dead-letters", tags=["dead letters"],
                       route_class=StrictJsonRoute)
    not_found = {"description": "No such dead letter.",
                 "content": {"application/json": {"example": {
                     "error": "unknown_dead_letter", "message": "no dead letter 7"}}}}

    @router.get("", dependencies=[read])
    async def list_route(
        *,
        edge: str | None = None, stream: str | None = None,
        kind: Literal["record", "batch", "message", "event"] | None = None,
        pending: Annotated[bool, Query(description="Only those not replayed yet.")] = False,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        before: Annotated[int | None, Query(description="Page: ids below this.")] = None,
    ) -> list[dict[str, Any]]:
        """Dead letters, newest first: identity, reason, size, replay state."""
        async with pool().acquire() as conn:
            return await list_dead_letters(conn, edge=edge, stream=stream, kind=kind,
                                           pending_only=pending, limit=limit, before_id=before)

    @router.get("/{letter_id}", dependencies=[read], responses={404: not_found})
    async def show_route(letter_id: int) -> Response:
        """One dead letter with its bytes (base64) and, for a record, what it decodes to."""
        async with pool().acquire() as conn:
            found = await get_dead_letter(conn, letter_id)
        if found is None:
            return JSONResponse({"error": "unknown_dead_letter",
                                 "message": f"no dead letter {letter_id}"}, status_code=404)
        found["data_b64"] = base64.b64encode(found.pop("data")).decode()
        return JSONResponse(jsonable_encoder(found))

    @router.post("/{letter_id}/replay", dependencies=[write], responses={
        404: not_found,
        409: {"description": "A dead letter without record identity (message, event)."},
        422: {"description": "Still refused by the validator or PostgreSQL; the reason."}})
    async def replay_route(letter_id: int) -> Response:
        """Write the dead-lettered record(s) with their original identity, exactly once."""
        try:
            async with pool().acquire() as conn:
                result = await replay_dead_letter(conn, letter_id)
        except NotReplayable as exc:
            status = {"unknown_dead_letter": 404, "no_identity": 409}.get(exc.code, 422)
            return JSONResponse({"error": exc.code, "message": str(exc)}, status_code=status)
        return JSONResponse({"id": result.id, "inserted": result.inserted,
                             "already_replayed": result.already_replayed})

    return router
