"""``unless``: an awaitable's result or error, or Interrupted with it cancelled."""

from __future__ import annotations

import asyncio

import pytest

from broker.interrupting import Interrupted, unless


async def test_the_result_or_the_error_when_it_completes_first() -> None:
    async def value() -> int:
        return 7

    async def failing() -> int:
        raise ValueError("no")

    assert await unless(value(), asyncio.Event()) == 7
    with pytest.raises(ValueError, match="no"):
        await unless(failing(), asyncio.Event())


async def test_interrupted_when_the_event_is_set_first_and_nothing_left_running() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()
    event = asyncio.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    waiting = asyncio.create_task(unless(forever(), event))
    await asyncio.wait_for(started.wait(), 5)
    event.set()
    with pytest.raises(Interrupted):
        await asyncio.wait_for(waiting, 5)
    assert cancelled.is_set()  # cancelled and awaited before unless returned
