"""The ingest process keeps the heap memory it frees, instead of handing it back at once.

Every group allocates and frees the same few large blocks: batch bodies (up to 16 MiB
decompressed), a joined JSON text per validation chunk, a group's binary COPY data
(~4 MiB per 16,000 records). glibc's malloc serves a block over its mmap threshold
(128 KiB at first, raised as such blocks are freed) with a fresh ``mmap`` and returns
free memory at the top of the heap to the kernel past its trim threshold; each fresh
page then costs a page fault (zeroed by the kernel) the next time it is touched. Measured
in one process (decode, validate and write of 400,000 records into a real PostgreSQL):
~120,000 -> ~60,000 minor faults and 5.1-5.6 -> 4.0-4.4 µs of CPU per record with the
values below (the rest of the faults are start-up).

:func:`keep_freed_heap` sets, for this process only (``edgesync ingest``, not a process
that shares its interpreter with other services, e.g. ``edgesync up``):

- ``M_MMAP_THRESHOLD`` = :data:`MMAP_THRESHOLD_BYTES`: blocks below it come from the
  heap, so a freed one is reused by the next group;
- ``M_TRIM_THRESHOLD`` = :data:`TRIM_THRESHOLD_BYTES`: up to that much free memory at the
  top of the heap is kept (the size of a worker's group budget);
- ``M_TOP_PAD`` = :data:`TOP_PAD_BYTES`: the heap grows in steps of that much.

Memory stays bounded: what is kept is at most what a group used at its peak plus the
trim threshold. Elsewhere than glibc (musl, macOS) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Final

import structlog

__all__ = ["MMAP_THRESHOLD_BYTES", "TOP_PAD_BYTES", "TRIM_THRESHOLD_BYTES", "keep_freed_heap"]

log = structlog.get_logger(__name__)

MMAP_THRESHOLD_BYTES: Final = 32 * 1024**2
"""The largest mmap threshold glibc accepts on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``):
a 16 MiB batch body is a heap block too."""
TRIM_THRESHOLD_BYTES: Final = 64 * 1024**2
"""Free memory at the heap's top kept for the next group (the default group budget)."""
TOP_PAD_BYTES: Final = 16 * 1024**2
"""Extra memory asked of the kernel whenever the heap grows."""
_M_TRIM_THRESHOLD: Final = -1
_M_TOP_PAD: Final = -2
_M_MMAP_THRESHOLD: Final = -3


def keep_freed_heap() -> bool:
    """Apply the settings above to this process's malloc; True when glibc took them."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("heap_tuning_unavailable", reason="no mallopt (not glibc)")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    results = [mallopt(option, value) for option, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (_M_TOP_PAD, TOP_PAD_BYTES),
    )]
    taken = all(r == 1 for r in results)
    log.info("heap_tuned" if taken else "heap_tuning_refused",
             mmap_threshold=MMAP_THRESHOLD_BYTES, trim_threshold=TRIM_THRESHOLD_BYTES,
             top_pad=TOP_PAD_BYTES)
    return taken
