"""Pausing the cyclic garbage collector around the ingest's allocation-heavy loops.

Decoding a group and building its rows allocate tens of thousands of small objects
(records, row tuples, a fleet's per-batch envelopes) that all stay alive until the
group is written. The cyclic GC, triggered by the allocation count, rescans them
again and again although none of them is part of a cycle: ~10 % of the ingest's
CPU in a fleet's fan-in drain (measured, issue 12). :func:`paused_gc` pauses it for
one such loop; the objects are freed by reference counting as before, and a cycle
made meanwhile (there is none in these loops) would only be collected later.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["paused_gc"]


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
