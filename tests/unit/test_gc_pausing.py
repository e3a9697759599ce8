"""held_gc: the cyclic GC stays paused across awaits while any group holds it, comes
back when the last one lets go, and never stays off longer than the watchdog allows."""

from __future__ import annotations

import asyncio
import gc

import pytest

from cloud_ingest.gc_pausing import held_gc, paused_gc
from tests.support.waiting import until


async def test_paused_across_awaits_until_the_last_holder_lets_go() -> None:
    assert gc.isenabled()
    first_in, second_done = asyncio.Event(), asyncio.Event()

    async def second() -> None:
        await first_in.wait()
        with held_gc(max_pause_s=60):
            await asyncio.sleep(0)
            assert not gc.isenabled()
        second_done.set()

    task = asyncio.create_task(second())
    with held_gc(max_pause_s=60):
        first_in.set()
        await second_done.wait()  # the other holder came and went meanwhile
        assert not gc.isenabled()
        with paused_gc():  # a synchronous pause inside leaves the hold as it is
            pass
        assert not gc.isenabled()
    await task
    assert gc.isenabled()


async def test_the_watchdog_turns_the_gc_on_while_a_group_still_holds_it() -> None:
    """A group stuck (a database outage) must not keep the GC off for its duration."""
    with held_gc(max_pause_s=0.05):
        assert not gc.isenabled()
        await until(gc.isenabled, timeout=5, message="the watchdog never resumed the GC")
        with held_gc(max_pause_s=60):  # a later group pauses it again
            assert not gc.isenabled()
        assert not gc.isenabled()  # still held (by the first), its watchdog not due
    assert gc.isenabled()  # the last holder leaving turns it on


async def test_a_gc_someone_else_turned_off_is_left_off() -> None:
    gc.disable()
    try:
        with held_gc(max_pause_s=0.01):
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_held_outside_an_event_loop_it_refuses_and_leaves_the_gc_on() -> None:
    assert gc.isenabled()
    with pytest.raises(RuntimeError), held_gc():
        pass
    assert gc.isenabled()
