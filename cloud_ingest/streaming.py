"""A streaming HTTP response that always releases what it holds: the live tails and
NDJSON streams of the records API and the console's live tail each hold a PostgreSQL
connection and a slot of the API's stream limits for as long as they run."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
from fastapi.responses import StreamingResponse

__all__ = ["ClosingStream", "tail_connection"]


class ClosingStream(StreamingResponse):
    """A streaming response that runs ``on_close`` however it ends: also when it is
    never iterated (a client gone before the first chunk), which an async generator's
    own ``finally`` does not see."""

    def __init__(self, content: AsyncIterator[bytes], *, on_close: Callable[[], Any],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            done = self._on_close()
            if inspect.isawaitable(done):
                await done


async def tail_connection(dsn: str, release: Callable[[], None]
                          ) -> tuple[asyncpg.Connection, Callable[[], Awaitable[None]]]:
    """A live tail's own PostgreSQL connection, and the close that gives back both it
    and the tail's slot (``release``, of the API's stream limits); a failed connect
    gives the slot back at once."""
    try:
        conn = await asyncpg.connect(dsn)
    except BaseException:
        release()
        raise

    async def close() -> None:
        release()
        if not conn.is_closed():
            await conn.close()

    return conn, close
