"""The console's live parts, as Server-Sent Events of HTML fragments (htmx's SSE
extension swaps each named event into the element that ``sse-swap``s it).

- ``/ui/fleet/events``: the fleet page's rows and totals, re-read every
  :data:`REFRESH_S` for the same query (filter, sort, page) the page shows;
- ``/ui/edges/{edge}/events``: the edge's summary, streams, chart, commands and
  dead letters;
- ``/ui/data/tail``: committed records as they commit (the commit-ordered feed,
  as ``/v1/records/tail``), one table row each. Like that tail it holds a
  PostgreSQL connection of its own, so it counts against the same limits
  (``api.max_live_tails`` in all, ``api.max_streams_per_operator`` per operator):
  one more is refused with a ``refused`` event saying why, not a connection more.

A fragment is sent only when it changed. The session is checked again before every
read (the cookie's age, the token against the operators table, the read scope): once
it has ended (logged out elsewhere, expired, the token revoked) the stream sends one
``session`` event and ends, and ``console.js`` stops the page's live updates and says
so, instead of leaving the last numbers on screen as if they were live or retrying
for ever. A stream also ends after :data:`LIFETIME_S` and the browser reconnects.
Each open page costs one query round every :data:`REFRESH_S` (plus the token's
lookup), and a tail holds one connection of its own.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from broker.errors import EdgesyncError
from broker.feed import Filters, follow, parse_start_at, resolve_start
from broker.protocol.tokens import is_valid_token
from cloud_ingest.console.pages import PREFIX, LoginRequired, Viewer, whole_number
from cloud_ingest.console.queries import (
    FleetQuery,
    edge_detail,
    fleet_page,
    watermark_history,
)
from cloud_ingest.console.rendering import SECURITY_HEADERS, Renderer
from cloud_ingest.dead_letters import list_dead_letters
from cloud_ingest.streaming import ClosingStream, tail_connection

if TYPE_CHECKING:
    from cloud_ingest.api.records import TailLimit
    from cloud_ingest.api.service import Api

__all__ = ["LIFETIME_S", "REFRESH_S", "REFUSED", "SESSION_ENDED", "console_live", "sse_event"]

REFRESH_S: Final = 2.0
"""Seconds between two reads of a live page."""

LIFETIME_S: Final = 120.0
"""Seconds a live stream lasts before the browser reconnects (and re-authenticates)."""

SESSION_ENDED: Final = "session"
"""The event a stream sends, last, when the viewer's session has ended."""

REFUSED: Final = "refused"
"""The one event of a live tail the API's stream limits refused (its reason)."""

_REFUSED_RETRY_MS: Final = 15_000
"""When the browser tries a refused tail again."""

_TAIL_ROWS_PER_EVENT: Final = 50
"""A tail sends at most this many rows per event: a screen, not a firehose."""


def sse_event(name: str, html: str) -> bytes:
    """One SSE event carrying ``html`` (every line its own ``data:`` field)."""
    lines = "".join(f"data: {line}\n" for line in html.splitlines() or [""])
    return f"event: {name}\n{lines}\n".encode()


def _stream(body: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]] | None = None
            ) -> StreamingResponse:
    headers = {**SECURITY_HEADERS, "X-Accel-Buffering": "no"}
    if on_close is not None:  # runs even if the body is never iterated (a client gone)
        return ClosingStream(body, on_close=on_close, media_type="text/event-stream",
                             headers=headers)
    return StreamingResponse(body, media_type="text/event-stream", headers=headers)


async def _refused(reason: str) -> AsyncIterator[bytes]:
    """A live tail refused by the API's stream limits: the reason, once, and the
    browser's next try in :data:`_REFUSED_RETRY_MS`."""
    yield f"retry: {_REFUSED_RETRY_MS}\n\n".encode()
    yield sse_event(REFUSED, reason)


_Recheck = Callable[[Request], Awaitable[Viewer]]


async def _session_ended(request: Request, recheck: _Recheck) -> bool:
    try:
        await recheck(request)
    except LoginRequired:
        return True
    return False


async def _changes(request: Request, read: Callable[[], Awaitable[dict[str, str]]],
                   recheck: _Recheck) -> AsyncIterator[bytes]:
    """Every :data:`REFRESH_S`, the fragments ``read`` returns that changed, while the
    session holds."""
    sent: dict[str, str] = {}
    ends = time.monotonic() + LIFETIME_S
    yield b"retry: 2000\n\n"
    while time.monotonic() < ends and not await request.is_disconnected():
        if await _session_ended(request, recheck):
            yield sse_event(SESSION_ENDED, "ended")
            return
        fragments = await read()
        out = [sse_event(k, v) for k, v in fragments.items() if sent.get(k) != v]
        sent.update(fragments)
        yield b"".join(out) if out else b": idle\n\n"
        await asyncio.sleep(REFRESH_S)


def console_live(api: Api, renderer: Renderer, viewer: _Recheck, tails: TailLimit
                 ) -> APIRouter:
    """The SSE routes; ``viewer`` is the pages' session dependency, ``tails`` the API's
    limits on streams that hold a PostgreSQL connection (the live tail does)."""
    router = APIRouter(prefix=PREFIX, include_in_schema=False)
    settings = api.settings
    current = Depends(viewer)

    @router.get("/fleet/events")
    async def fleet_events(  # noqa: PLR0917 (FastAPI injects by name)
        request: Request, v: Viewer = current, q: str | None = None,
        state: str | None = None, sort: str | None = None, order: str | None = None,
        page: str | None = None, per_page: str | None = None,
    ) -> StreamingResponse:
        query = FleetQuery.of(q=q, state=state, sort=sort, order=order,
                              page=whole_number(page), per_page=whole_number(per_page))

        async def read() -> dict[str, str]:
            async with api._db().acquire() as conn:
                fleet = await fleet_page(conn, query,
                                         offline_after_s=settings.edge_offline_after_s)
            ctx = v.context(fleet=fleet, query=query)
            return {"rows": renderer.text("_fleet_rows.html", ctx),
                    "totals": renderer.text("_fleet_totals.html", ctx)}

        return _stream(_changes(request, read, viewer))

    @router.get("/edges/{edge}/events")
    async def edge_events(edge: str, request: Request, v: Viewer = current) -> Response:
        if not is_valid_token(edge):
            return Response(status_code=404, headers=SECURITY_HEADERS)

        async def read() -> dict[str, str]:
            async with api._db().acquire() as conn:
                detail = await edge_detail(conn, edge,
                                           offline_after_s=settings.edge_offline_after_s)
                history = await watermark_history(conn, edge)
                letters = await list_dead_letters(conn, edge=edge, limit=10)
            if detail is None:
                return {}
            commands = await api.list_commands(edge, status=None, limit=10)
            ctx = v.context(edge=detail, history=history, dead_letters=letters,
                            commands=commands)
            return {name: renderer.text(f"_edge_{name}.html", ctx)
                    for name in ("summary", "streams", "commands", "deadletters")}

        return _stream(_changes(request, read, viewer))

    @router.get("/data/tail")
    async def tail(request: Request, v: Viewer = current, edge: str | None = None,
                   stream: str | None = None) -> StreamingResponse:
        filters = Filters.of(edges=[edge] if edge and is_valid_token(edge) else None,
                             streams=[stream] if stream and is_valid_token(stream) else None)
        try:
            release = tails.acquire(v.operator.name)
        except EdgesyncError as exc:  # every tail slot taken, or this operator's share
            return _stream(_refused(str(exc)))
        conn, close = await tail_connection(settings.postgres_dsn, release)

        try:
            start = await resolve_start(conn, parse_start_at("latest"))
        except BaseException:
            await close()
            raise

        async def events() -> AsyncIterator[bytes]:
            ends = time.monotonic() + LIFETIME_S
            try:
                yield b"retry: 2000\n\n"
                async for page in follow(conn, start, filters, poll_s=REFRESH_S, idle=True):
                    if time.monotonic() > ends or await request.is_disconnected():
                        break
                    if await _session_ended(request, viewer):
                        yield sse_event(SESSION_ENDED, "ended")
                        break
                    if not page.records:
                        yield b": idle\n\n"
                        continue
                    rows = [r.to_json() for r in page.records[-_TAIL_ROWS_PER_EVENT:]]
                    html = renderer.text("_tail_rows.html", {"rows": [
                        {**r, "payload_text": _short(r["payload"])} for r in reversed(rows)]})
                    yield sse_event("record", html)
            finally:
                await close()

        return _stream(events(), on_close=close)

    return router


def _short(payload: Any, limit: int = 160) -> str:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 1] + "…"
