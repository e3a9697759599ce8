"""Following the feed as it commits: pages after a cursor, waiting on LISTEN/NOTIFY
when caught up (a poll interval only as a safety net). Used by ``edgesync tail``
and the HTTP live tail; :class:`~broker.feed.subscribing.Subscription` adds names,
checkpoints and the lease on top of the same reads."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from broker.feed.positions import FEED_CHANNEL
from broker.feed.reading import PAGE_MAX_BYTES, Connection, Filters, Page, read_page

__all__ = ["follow"]


async def follow(conn: Connection, after: int, filters: Filters, *, limit: int = 1000,
                 poll_s: float = 5.0, stop_when_caught_up: bool = False,
                 idle: bool = False, max_bytes: int = PAGE_MAX_BYTES) -> AsyncIterator[Page]:
    """Pages after cursor ``after``, for ever (or until caught up, if asked).

    Yields only pages with records or completeness news, and with ``idle`` an empty
    page after each ``poll_s`` without any (a heartbeat); ``page.cursor`` always
    says where the next one starts. A page holds ``limit`` records and ``max_bytes``
    bytes at most (see :func:`~broker.feed.reading.read_page`). ``conn`` must not be
    shared meanwhile (it LISTENs on the feed channel while this runs).
    """
    woken = asyncio.Event()

    def notified(*_: Any) -> None:
        woken.set()

    await conn.add_listener(FEED_CHANNEL, notified)
    try:
        while True:
            woken.clear()  # a commit notified while reading wakes the next wait
            page = await read_page(conn, after, filters, limit=limit, max_bytes=max_bytes)
            after = page.cursor
            if page.records or page.watermarks:
                yield page
            if not page.caught_up:
                continue
            if stop_when_caught_up:
                return
            try:
                await asyncio.wait_for(woken.wait(), timeout=poll_s)
            except TimeoutError:
                if idle:
                    yield Page([], after, {}, caught_up=True)
    finally:
        if not conn.is_closed():
            with contextlib.suppress(Exception):
                await conn.remove_listener(FEED_CHANNEL, notified)
