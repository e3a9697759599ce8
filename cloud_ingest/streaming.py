"""A streaming HTTP response that always releases what it holds: the live tails and
NDJSON streams of the records API and the console's live tail each hold a PostgreSQL
connection and a slot of the API's stream limits for as long as they run."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

__all__ = ["ClosingStream"]


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
