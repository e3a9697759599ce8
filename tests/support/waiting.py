"""Waiting on a condition with a deadline: how every test waits, never on ``sleep`` alone."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Container
from typing import Any, TypeVar

__all__ = ["until", "until_in"]

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


async def until_in(
    fetch: Callable[[], Awaitable[dict[str, Any]]],
    key: str,
    wanted: Container[Any],
    *,
    timeout: float,
    what: str,
) -> dict[str, Any]:
    """Fetch a resource until its ``key`` is one of ``wanted``; returns that answer.

    Raises:
        AssertionError: not there after ``timeout`` seconds; says ``what`` and the
            last answer, so a failure shows where the resource stopped.
    """
    last: dict[str, Any] = {}

    async def reached() -> dict[str, Any] | None:
        nonlocal last
        last = await fetch()
        return last if last[key] in wanted else None

    try:
        return await until(reached, timeout=timeout, interval=0.05)
    except AssertionError:
        raise AssertionError(f"{what}: {last}") from None
