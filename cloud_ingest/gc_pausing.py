"""Pausing the cyclic garbage collector around the ingest's allocation-heavy work.

Decoding a group and building its rows allocate tens of thousands of small objects
(records, row tuples, a fleet's per-batch envelopes) that all stay alive until the
group is written. The cyclic GC, triggered by the allocation count, rescans them
again and again although none of them is part of a cycle: ~10 % of the ingest's
CPU in a fleet's fan-in drain (measured, issue 12). None of them is part of a cycle,
so reference counting frees them all once the group is done.

- :func:`paused_gc` pauses it for one loop with no ``await`` inside.
- :func:`held_gc` keeps it paused for a whole group, awaits included (decode, write,
  commit, acks), so that the collection the allocations have owed since the pause
  runs once the group's objects are freed, with little left to scan (re-enabled at
  the end of the decode loop, it scanned the whole live group: 12 % of a bulk
  drain's ingest CPU, 5 % of a fan-in's, in py-spy). Other tasks run meanwhile (the
  second worker, the watermark publisher), so the pause is process-wide and bounded:
  it lasts while any holder holds it, and never more than :data:`MAX_PAUSE_S` at a
  stretch: a watchdog then turns the GC on again (the collection owed runs at the
  next allocation), and only a holder arriving after that pauses it again. A group
  stuck on a database outage therefore never keeps the GC off: at most
  :data:`MAX_PAUSE_S` after the last group began. Where the ingest shares its process
with other services (``edgesync up`` runs the bridges in the same loop), they share
the pause too: bounded as above, and under a steady load the GC runs after each
watchdog turn rather than by allocation count.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator

__all__ = ["MAX_PAUSE_S", "held_gc", "paused_gc"]

MAX_PAUSE_S = 1.0
"""Longest stretch :func:`held_gc` keeps the GC off: a few groups' worth (a group takes
~0.1-0.3 s), so a pause covers a group or two, and cycles made by other tasks meanwhile
wait at most this long for a collection."""


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic GC for the block. Only around code with no ``await`` inside:
    other tasks must not run (and allocate) with the GC paused."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


class _Hold:
    """The process-wide state of :func:`held_gc` (one event loop per process)."""

    holders = 0
    paused = False
    """Whether this module turned the GC off (and so must turn it on again)."""
    watchdog: asyncio.TimerHandle | None = None


def _resume() -> None:
    if _Hold.watchdog is not None:
        _Hold.watchdog.cancel()
        _Hold.watchdog = None
    if _Hold.paused:
        _Hold.paused = False
        gc.enable()


@contextlib.contextmanager
def held_gc(max_pause_s: float = MAX_PAUSE_S) -> Iterator[None]:
    """Keep the cyclic GC paused for the block, awaits included, while any holder
    holds it and at most ``max_pause_s`` at a stretch (module docstring). Must be
    entered in a running event loop (the watchdog is a loop timer). If the GC is off
    already (someone else's pause), it is left as it is."""
    loop = asyncio.get_running_loop()  # first: outside a loop, raise with the GC untouched
    if not _Hold.paused and gc.isenabled():
        gc.disable()
        _Hold.paused = True
        _Hold.watchdog = loop.call_later(max_pause_s, _resume)
    _Hold.holders += 1
    try:
        yield
    finally:
        _Hold.holders -= 1
        if _Hold.holders == 0:
            _resume()
