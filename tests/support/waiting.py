"""Waiting on a condition with a deadline: how every test waits, never on ``sleep`` alone."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["until"]

T = TypeVar("T")


async def until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "",
) -> T:
    """Await ``predicate`` (sync or async) until it returns something truthy.

    Returns:
        The first truthy value, so callers can wait for and use a result.

    Raises:
        AssertionError: still falsy after ``timeout`` seconds; carries ``message``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() >= deadline:
            raise AssertionError(message or f"condition not met within {timeout}s: {predicate!r}")
        await asyncio.sleep(interval)
