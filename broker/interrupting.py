"""Awaiting something that an event may end early (a shutdown, a lost request).

:func:`unless` runs an awaitable until it completes or the event is set, whichever
comes first; when the event wins, the awaitable is cancelled and awaited, so nothing
is left running, and :class:`Interrupted` says so.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["Interrupted", "unless"]

T = TypeVar("T")


class Interrupted(Exception):
    """The event was set before the awaitable completed (it was cancelled)."""


async def unless(awaitable: Awaitable[T], event: asyncio.Event) -> T:
    """``awaitable``'s result (or its error), unless ``event`` is set first.

    Raises:
        Interrupted: ``event`` was set first; the awaitable was cancelled and awaited.
    """
    task = asyncio.ensure_future(awaitable)
    ended = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((task, ended), return_when=asyncio.FIRST_COMPLETED)
    finally:
        ended.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if task.cancelled():
        raise Interrupted
    return task.result()
