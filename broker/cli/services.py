"""Running one service from its settings, and the lean start of a bridge.

:func:`run_service` is what every service command does once its settings are
read: SIGINT/SIGTERM set a stop flag, and the outcome becomes the exit status
(:data:`EXIT_ERROR` for an error of ours, :data:`EXIT_CRASHED` for anything
else a root task raised). The ``edgesync`` command line uses it for
``bridge``, ``ingest`` and ``api``.

:func:`bridge_main` is ``edgesync bridge`` (and ``python -m broker bridge``)
without the command line: a bridge runs on small devices beside the
applications it serves, and its idle memory is mostly imported code. It does
not import the CLI (typer, rich and every subcommand: ~3.5 MiB), and before
anything imports them it keeps out two optional libraries the bridge never
uses (:func:`skip_unused_libraries`): nats-py's WebSocket transport pulls in
aiohttp (~8.5 MiB) whenever it is installed, and structlog loads rich
(~4 MiB) for console tracebacks. It also has glibc's malloc keep the
request-sized buffers it frees for the next request (:func:`reuse_freed_memory`)
instead of handing them back to the kernel and faulting fresh pages in again;
``edgesync ingest`` does the same with its own sizes (:data:`INGEST_MALLOC`).
Nothing here runs at import time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from broker.settings import Settings

__all__ = [
    "EXIT_CRASHED",
    "EXIT_ERROR",
    "INGEST_MALLOC",
    "MALLOC_MMAP_THRESHOLD_BYTES",
    "MALLOC_TRIM_THRESHOLD_BYTES",
    "MallocTuning",
    "bridge_main",
    "reuse_freed_memory",
    "run_from_env",
    "run_service",
    "skip_unused_libraries",
]

EXIT_CRASHED: Final = 1
"""A service's root task crashed: Kubernetes must see a failed container, not a clean exit."""
EXIT_ERROR: Final = 2
"""An error of ours (bad settings, a root task that ended unasked, ...)."""
MALLOC_MMAP_THRESHOLD_BYTES: Final = 4 * 1024**2
"""Blocks below this come from malloc's heap, not from pages mapped for them alone: a
records request's buffers (up to a few hundred KiB each at the SDK's batch size)."""
MALLOC_TRIM_THRESHOLD_BYTES: Final = 16 * 1024**2
"""Free memory at the top of a malloc heap is kept up to this much, not handed back to
the kernel: a few requests' buffers. Memory kept never exceeds what was in use before."""
_M_TRIM_THRESHOLD: Final = -1  # from <malloc.h>
_M_TOP_PAD: Final = -2
_M_MMAP_THRESHOLD: Final = -3


@dataclass(frozen=True, slots=True)
class MallocTuning:
    """What :func:`reuse_freed_memory` sets: glibc's ``M_MMAP_THRESHOLD`` (blocks below
    it come from the heap, so a freed one is reused), ``M_TRIM_THRESHOLD`` (free memory
    at the heap's top kept up to this much) and, if given, ``M_TOP_PAD`` (the heap grows
    in steps of this much). Memory kept never exceeds what was in use at a peak plus
    the trim threshold."""

    mmap_threshold: int = MALLOC_MMAP_THRESHOLD_BYTES
    trim_threshold: int = MALLOC_TRIM_THRESHOLD_BYTES
    top_pad: int | None = None


INGEST_MALLOC: Final = MallocTuning(mmap_threshold=32 * 1024**2, trim_threshold=64 * 1024**2,
                                    top_pad=16 * 1024**2)
"""``edgesync ingest``'s: every group allocates and frees the same large blocks (batch
bodies up to 16 MiB decompressed, a joined JSON text per validation chunk, the
group's binary COPY data). 32 MiB is the largest mmap threshold glibc accepts on
64-bit, so a 16 MiB body is a heap block too; 64 MiB kept is a worker's group budget.
Measured in one process (decode, validate and write 400,000 records into a real
PostgreSQL): ~120,000 -> ~60,000 minor faults and 5.1-5.6 -> 4.0-4.4 µs of CPU per
record. Not for ``edgesync up``, whose one process runs every service."""


def skip_unused_libraries(environ: Mapping[str, str]) -> list[str]:
    """Keep libraries a service does not use from being imported; returns their names.

    A ``None`` entry in ``sys.modules`` makes ``import name`` raise ImportError,
    which both libraries' users handle as "not installed": nats-py then offers
    no ``ws://`` transport, structlog renders tracebacks without rich. So
    aiohttp stays out unless a NATS setting names a WebSocket URL, and rich
    unless logs are for a terminal (``EDGESYNC_LOG__FORMAT=console``).
    Libraries already imported are left alone.
    """
    skipped: list[str] = []
    nats_values = [value for name, value in environ.items() if name.startswith("EDGESYNC_NATS")]
    if not any("ws://" in value or "wss://" in value for value in nats_values):
        skipped.append("aiohttp")
    log_format = environ.get("EDGESYNC_LOG__FORMAT", "json").strip().lower()
    if log_format == "json" and "console" not in environ.get("EDGESYNC_LOG", ""):
        skipped.append("rich")
    skipped = [name for name in skipped if name not in sys.modules]
    for name in skipped:
        sys.modules[name] = None  # type: ignore[assignment]  # the documented import block
    return skipped


def reuse_freed_memory(tuning: MallocTuning = MallocTuning()) -> bool:
    """Have glibc's malloc reuse the large buffers a process frees; True if it took.

    Every records request passes its body, a few hundred KiB, through several buffers
    (HTTP parsing, the JSON check, the chunk, the batch and its NATS command). By
    default glibc maps fresh pages for each block above 128 KiB (a threshold it raises
    as they are freed) and hands the top of its heap back to the kernel whenever more
    than twice that is free, so the next request's buffers are new pages again, zeroed
    and faulted in one by one: page faults, ``brk`` and ``munmap`` were a large part of
    the bridge's system CPU under load (bench/README.md, issue 17). With the
    thresholds of ``tuning`` (by default the bridge's, sized for its requests) the
    freed blocks are reused. Setting them also ends glibc's own
    adjustment of the first one. Elsewhere than Linux, or without glibc's ``mallopt``,
    nothing changes; nor where the operator tunes malloc already (a ``MALLOC_*``
    variable, or ``glibc.malloc`` in ``GLIBC_TUNABLES``): theirs wins.
    """
    if not sys.platform.startswith("linux") or _malloc_tuned_by_operator(os.environ):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    options = [(_M_MMAP_THRESHOLD, tuning.mmap_threshold),
               (_M_TRIM_THRESHOLD, tuning.trim_threshold)]
    if tuning.top_pad is not None:
        options.append((_M_TOP_PAD, tuning.top_pad))
    return all(mallopt(option, value) == 1 for option, value in options)


def _malloc_tuned_by_operator(environ: Mapping[str, str]) -> bool:
    return ("glibc.malloc" in environ.get("GLIBC_TUNABLES", "")
            or any(name.startswith("MALLOC_") for name in environ))


def run_service(
    body: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
) -> tuple[int, BaseException | None]:
    """Run ``body(stop)`` with SIGINT/SIGTERM setting ``stop``.

    Returns:
        The exit status (0, :data:`EXIT_ERROR` or :data:`EXIT_CRASHED`) and the
        error that caused a non-zero one (already logged).
    """
    import structlog

    from broker.errors import EdgesyncError

    log = structlog.get_logger("broker.cli.main")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await body(stop)

    try:
        asyncio.run(main())
    except EdgesyncError as exc:
        log.error("service_failed", error=f"{type(exc).__name__}: {exc}")
        return EXIT_ERROR, exc
    except Exception as exc:
        log.critical("service_crashed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        return EXIT_CRASHED, exc
    return 0, None


def run_from_env(
    body: Callable[[Settings, asyncio.Event], Coroutine[Any, Any, None]],
) -> tuple[int, BaseException | None]:
    """:func:`run_service` with the settings read from the environment and logging
    configured from them, once, before the service starts."""
    from broker.errors import ConfigError
    from broker.logs import configure_logging
    from broker.settings import load_settings

    try:
        settings = load_settings()
    except ConfigError as exc:  # before logging is set up: the caller prints it
        return EXIT_ERROR, exc
    configure_logging(settings.log.level, settings.log.format)
    return run_service(lambda stop: body(settings, stop))


def bridge_main() -> int:
    """``edgesync bridge``: one edge bridge from ``EDGESYNC_*`` settings; the exit status."""
    skip_unused_libraries(os.environ)
    reuse_freed_memory()
    from edge_bridge.bridge import Bridge

    code, error = run_from_env(
        lambda settings, stop: Bridge(settings.bridge, settings.nats).run(stop))
    if error is not None and code == EXIT_ERROR:
        print(f"error: {error}", file=sys.stderr)
    return code
