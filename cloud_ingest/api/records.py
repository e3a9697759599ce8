"""Committed records over HTTP, for consumers in any language (issue 13).

| method & path                              | what                                          |
| ------------------------------------------ | --------------------------------------------- |
| ``GET /v1/records``                        | a page after a cursor (JSON), or every record |
|                                            | up to now as NDJSON (``format=ndjson``)       |
| ``GET /v1/records/tail``                   | live tail, Server-Sent Events; resumes from   |
|                                            | ``Last-Event-ID`` (each event's id is a cursor) |
| ``GET /v1/completeness``                   | per (edge, stream, epoch), the watermark at a |
|                                            | cursor                                        |
| ``GET/PUT /v1/subscriptions/{name}``       | a named subscription's checkpoint             |

Reads follow the commit-ordered feed (:mod:`broker.feed`): a cursor never skips
a row that commits later, and rows of open transactions are never returned.
Every route is a read (the read guard of :mod:`cloud_ingest.api.auth`) but the
checkpoint PUT, which needs the ``consume`` scope: moving a subscription's checkpoint
makes its consumer skip records.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from broker.errors import Conflict, InvalidInput, NotFound, TemporaryError, TooManyRequests
from broker.feed import (
    Filters,
    checked_cursor,
    completeness_at,
    encode_cursor,
    follow,
    parse_start_at,
    read_page,
    resolve_start,
)
from broker.feed.reading import PAGE_MAX_BYTES, StreamKey
from cloud_ingest.streaming import ClosingStream, tail_connection
from cloud_ingest.strict_json import StrictJsonRoute

__all__ = ["CheckpointIn", "SubscriptionOut", "TailLimit", "record_routes"]

_NDJSON = "application/x-ndjson"
_SSE_HEARTBEAT_S = 15.0
"""Seconds between SSE comments while nothing commits: keeps proxies from closing
an idle stream."""


_JSON_PAGE_DEFAULT = 1000
"""Records of a JSON page when the request gives no ``limit``."""
_NDJSON_DEFAULT = 1_000_000
"""Records of an NDJSON stream when the request gives no ``limit``: the end of the feed,
in practice (it is streamed page by page), as its documentation promises; it was the
JSON page's 1,000, so a large range stopped after 1,000 records."""
_NDJSON_PAGE = 1000
"""Records per read of an NDJSON stream (and at most ``page_max_bytes`` of them): what
one stalled client keeps in memory is a few such pages (the one being sent, the one
handed over, the one read next)."""

_TAIL_RETRY_S = 5.0
"""Retry-After of a tail refused at the cap."""


class TailLimit:
    """How many streams may be open at once: live tails in all (each holds a PostgreSQL
    connection), and live tails plus NDJSON streams per operator (so that one token, a
    runaway dashboard or a loop of stalled clients, cannot take every slot)."""

    def __init__(self, limit: int, gauge: Any = None, refused: Any = None, *,
                 per_operator: int | None = None) -> None:
        self.limit = limit
        self.per_operator = per_operator
        self.open = 0
        self.by_operator: dict[str, int] = {}
        self._gauge = gauge
        self._refused = refused

    def acquire(self, operator: str, *, tail: bool = True) -> Callable[[], None]:
        """Count one more stream of ``operator`` (a live tail unless ``tail`` is False).

        Returns:
            Its release, which may be called more than once.

        Raises:
            TooManyRequests: ``operator`` has ``per_operator`` streams open (429).
            TemporaryError: ``limit`` tails are open (503 with Retry-After).
        """
        mine = self.by_operator.get(operator, 0)
        if self.per_operator is not None and mine >= self.per_operator:
            raise TooManyRequests(
                f"operator {operator!r} has {mine} live tails and NDJSON streams open "
                f"({self.per_operator} at most, api.max_streams_per_operator); close one "
                "or retry later", delay=_TAIL_RETRY_S, code="too_many_streams")
        if tail and self.open >= self.limit:
            if self._refused is not None:
                self._refused.inc()
            raise TemporaryError(
                f"too many live tails open ({self.limit}, api.max_live_tails); retry later "
                "or page with GET /v1/records", delay=_TAIL_RETRY_S, code="too_many_tails")
        self.by_operator[operator] = mine + 1
        if tail:
            self.open += 1
            self._set()
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self.by_operator[operator] - 1
            if left:
                self.by_operator[operator] = left
            else:
                del self.by_operator[operator]
            if tail:
                self.open -= 1
                self._set()

        return release

    def _set(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self.open)


def _operator_of(request: Request) -> str:
    operator = getattr(request.state, "operator", None)
    return str(getattr(operator, "name", "") or "")


class SubscriptionOut(BaseModel):
    name: str
    cursor: str = Field(description="The checkpoint: everything at or before it is done.")
    filters: dict[str, Any]
    holder: str | None = Field(description="The SDK process holding the lease, if any.")
    lease_until: datetime | None
    updated_at: datetime


class CheckpointIn(BaseModel):
    cursor: str = Field(description="A cursor the feed returned (or `earliest`/`latest`).")


def _watermarks(marks: dict[StreamKey, int]) -> list[dict[str, Any]]:
    return [{"edge": e, "stream": s, "epoch": ep, "epoch_str": str(ep), "watermark": w}
            for (e, s, ep), w in sorted(marks.items())]


def record_routes(pool: Callable[[], asyncpg.Pool], dsn: str, *, read: Any,
                  commit: Any = None, tails: TailLimit | None = None,
                  page_max_bytes: int = PAGE_MAX_BYTES) -> APIRouter:
    """The records routes (mounted by :mod:`cloud_ingest.api.routes`).

    Args:
        pool: returns the API's pool (pages, checkpoints).
        dsn: where a live tail opens its own connection (it LISTENs for its life, so
            it does not hold one of the pool's).
        read: the dependency guarding reads.
        commit: the dependency guarding the one write, moving a subscription's
            checkpoint (it can make another consumer skip what it has not read);
            None: ``read`` alone.
        tails: the caps on live tails open at once (default 100) and on streams per
            operator (default none).
        page_max_bytes: bytes of records per read of the feed (a JSON page, a page of
            an NDJSON stream or of a tail); a single larger record comes alone.
    """
    tails = tails or TailLimit(100)
    router = APIRouter(tags=["records"], dependencies=[read], route_class=StrictJsonRoute)

    def filters_of(edge: list[str] | None, stream: list[str] | None,
                   since: datetime | None, until: datetime | None) -> Filters:
        return Filters.of(edges=edge, streams=stream, since=since, until=until)

    async def start_of(conn: asyncpg.Connection | Any, after: str | None,
                       from_: str | None, subscription: str | None) -> int:
        if after is not None:
            return await checked_cursor(conn, after)
        if subscription is not None:
            pos = await conn.fetchval(
                "SELECT position FROM feed_subscriptions WHERE name = $1", subscription)
            if pos is None:
                raise NotFound(f"no subscription {subscription!r}",
                               code="unknown_subscription")
            return int(pos)
        return await resolve_start(conn, parse_start_at(from_ or "earliest"))

    @router.get("/v1/records", responses={200: {"content": {_NDJSON: {}}}})
    async def records(
        request: Request,
        *,
        after: Annotated[str | None, Query(description="Cursor: records after it.")] = None,
        from_: Annotated[str | None, Query(
            alias="from", description="Without `after`: earliest (default), latest, a "
            "duration ago (15m) or an ISO time.")] = None,
        subscription: Annotated[str | None, Query(
            description="Without `after`: start at this subscription's checkpoint.")] = None,
        edge: Annotated[list[str] | None, Query()] = None,
        stream: Annotated[list[str] | None, Query()] = None,
        since: Annotated[datetime | None, Query(description="Event time at or after.")]
        = None,
        until: Annotated[datetime | None, Query(description="Event time before.")] = None,
        limit: Annotated[int | None, Query(ge=1, le=1_000_000, description=(
            "Records at most (JSON pages: up to 10,000, default 1,000; a page also ends "
            "at api.page_max_bytes of records, with caught_up false; ndjson: default "
            "1,000,000)."))] = None,
        format: Annotated[Literal["json", "ndjson"], Query(description=(
            "json: one page with next_cursor; ndjson: records streamed up to the end "
            "of the feed (or limit), then a last line with next_cursor."))] = "json",
    ) -> Any:
        """Committed records after a cursor, in commit order. Pass ``next_cursor`` back
        as ``after`` for the next page; it moves even when the filters match nothing."""
        filters = filters_of(edge, stream, since, until)
        if format == "json":
            limit = _JSON_PAGE_DEFAULT if limit is None else limit
            if limit > 10_000:
                raise InvalidInput("limit: at most 10,000 per JSON page (use format=ndjson)",
                                   code="invalid_request")
            async with pool().acquire() as conn:
                page = await read_page(conn, await start_of(conn, after, from_, subscription),
                                       filters, limit=limit, max_bytes=page_max_bytes)
            return {"records": [r.to_json() for r in page.records],
                    "next_cursor": encode_cursor(page.cursor), "caught_up": page.caught_up,
                    "completeness": _watermarks(page.watermarks)}
        async with pool().acquire() as conn:  # fail before the 200 on a bad start
            start = await start_of(conn, after, from_, subscription)
        release = tails.acquire(_operator_of(request), tail=False)

        async def lines() -> AsyncIterator[bytes]:
            cursor, left = start, _NDJSON_DEFAULT if limit is None else limit
            try:
                while left > 0:
                    # A connection per page, back in the pool before the page is sent:
                    # a client that stops reading blocks this generator in its send, and
                    # must not hold one of the pool's few connections meanwhile (four
                    # stalled exports would otherwise stall every request of the API).
                    async with pool().acquire() as conn:
                        page = await read_page(conn, cursor, filters,
                                               limit=min(left, _NDJSON_PAGE),
                                               max_bytes=page_max_bytes)
                    cursor = page.cursor
                    left -= len(page.records)
                    if page.records:
                        yield b"".join(_line(r.to_json()) for r in page.records)
                    if page.caught_up:
                        break
                yield _line({"next_cursor": encode_cursor(cursor)})
            finally:
                release()

        return ClosingStream(lines(), media_type=_NDJSON, on_close=release)

    @router.get("/v1/records/tail", responses={200: {"content": {"text/event-stream": {}}}})
    async def tail(
        request: Request,
        *,
        last_event_id: Annotated[str | None, Header(description=(
            "Resume after this cursor (browsers send it when they reconnect)."))] = None,
        from_: Annotated[str | None, Query(alias="from", description=(
            "Without Last-Event-ID: latest (default), earliest, a cursor, a duration "
            "ago or an ISO time."))] = None,
        edge: Annotated[list[str] | None, Query()] = None,
        stream: Annotated[list[str] | None, Query()] = None,
    ) -> StreamingResponse:
        """Records as they commit, as Server-Sent Events: ``event: record`` with the
        record as JSON, ``event: completeness`` when a stream's watermark moves; every
        event's ``id`` is the cursor after it, so a reconnect resumes exactly."""
        filters = filters_of(edge, stream, None, None)
        conn, close = await tail_connection(dsn, tails.acquire(_operator_of(request)))

        try:
            start = (await checked_cursor(conn, last_event_id) if last_event_id
                     else await resolve_start(conn, parse_start_at(from_ or "latest")))
        except BaseException:
            await close()
            raise

        async def events() -> AsyncIterator[bytes]:
            try:
                yield b"retry: 1000\n\n"
                async for page in follow(conn, start, filters, poll_s=_SSE_HEARTBEAT_S,
                                         idle=True, max_bytes=page_max_bytes):
                    if not page.records and not page.watermarks:
                        yield b": idle\n\n"
                        continue
                    yield b"".join(_event("record", r.cursor, r.to_json())
                                   for r in page.records)
                    if page.watermarks:
                        yield _event("completeness", encode_cursor(page.cursor),
                                     _watermarks(page.watermarks))
            finally:
                await close()

        return ClosingStream(events(), media_type="text/event-stream", on_close=close,
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.get("/v1/completeness")
    async def completeness(
        *,
        cursor: Annotated[str | None, Query(description="Default: the end of the feed.")]
        = None,
        edge: Annotated[list[str] | None, Query()] = None,
        stream: Annotated[list[str] | None, Query()] = None,
    ) -> dict[str, Any]:
        """Per (edge, stream, epoch), the seq up to which everything is committed (and at
        or before ``cursor``), dropped on purpose or dead-lettered."""
        async with pool().acquire() as conn:
            at = (await checked_cursor(conn, cursor) if cursor is not None
                  else await resolve_start(conn, "latest"))
            marks = await completeness_at(conn, at, filters_of(edge, stream, None, None))
        return {"cursor": encode_cursor(at), "completeness": _watermarks(marks)}

    @router.get("/v1/subscriptions/{name}", response_model=SubscriptionOut,
                tags=["subscriptions"])
    async def get_subscription(name: str) -> dict[str, Any]:
        """A named subscription: its checkpoint and who holds it."""
        async with pool().acquire() as conn:
            row = await conn.fetchrow(
                "SELECT name, position, filters::text AS filters, holder, lease_until,"
                " updated_at FROM feed_subscriptions WHERE name = $1", name)
        if row is None:
            raise NotFound(f"no subscription {name!r}", code="unknown_subscription")
        return _subscription(row)

    @router.put("/v1/subscriptions/{name}", response_model=SubscriptionOut,
                tags=["subscriptions"], responses={409: {}},
                dependencies=[] if commit is None else [commit])
    async def put_subscription(name: str, body: CheckpointIn) -> dict[str, Any]:
        """Create a subscription or move its checkpoint (HTTP consumers commit here
        after handling a page). Refused (409) while an SDK process holds its lease."""
        if not name or len(name) > 200:
            raise InvalidInput("a subscription name is 1 to 200 characters",
                               code="invalid_subscription")
        async with pool().acquire() as conn:
            position = await resolve_start(conn, parse_start_at(body.cursor))
            row = await conn.fetchrow(
                "INSERT INTO feed_subscriptions AS s (name, position) VALUES ($1, $2)"
                # A new generation: an SDK holder whose lease lapsed must not overwrite
                # this checkpoint with its own (it gets lease_lost and resumes from here).
                " ON CONFLICT (name) DO UPDATE SET position = $2, updated_at = now(),"
                "  generation = s.generation + 1, holder = NULL, lease_until = NULL"
                "  WHERE s.holder IS NULL OR s.lease_until < now()"
                " RETURNING name, position, filters::text AS filters, holder, lease_until,"
                "  updated_at", name, position)
        if row is None:
            raise Conflict(f"subscription {name!r} is held by a consumer process",
                           code="subscription_busy")
        return _subscription(row)

    return router


def _subscription(row: asyncpg.Record) -> dict[str, Any]:
    return {"name": row["name"], "cursor": encode_cursor(row["position"]),
            "filters": json.loads(row["filters"]), "holder": row["holder"],
            "lease_until": row["lease_until"], "updated_at": row["updated_at"]}


def _line(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _event(kind: str, event_id: str, data: Any) -> bytes:
    body = json.dumps(data, separators=(",", ":"))
    return f"id: {event_id}\nevent: {kind}\ndata: {body}\n\n".encode()


