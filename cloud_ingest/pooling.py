"""PostgreSQL connection pools for the cloud services: wait for the database at
start-up, bound the wait for a connection where a caller must not queue without end,
and release connections within a deadline at shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg
import structlog

from cloud_ingest.db_errors import DATABASE_ERRORS, as_temporary

__all__ = ["BoundedPool", "close_pool", "connect_pool"]

log = structlog.get_logger(__name__)


class BoundedPool(asyncpg.Pool):
    """An asyncpg pool whose :meth:`acquire` (and so ``fetch``, ``execute``... which
    acquire through it) waits at most ``acquire_timeout_s`` for a connection unless
    told otherwise, then raises :class:`TimeoutError` (a database outage to every
    caller: the API answers 503). asyncpg's own waits without end."""

    __slots__ = ("_acquire_timeout",)

    def __init__(self, *args: Any, acquire_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acquire_timeout = acquire_timeout_s

    def acquire(self, *, timeout: float | None = None) -> Any:
        return super().acquire(timeout=self._acquire_timeout if timeout is None else timeout)


async def connect_pool(
    dsn: str,
    *,
    size: int,
    init: Callable[[asyncpg.Connection[asyncpg.Record]], Coroutine[Any, Any, None]]
    | None = None,
    retry_max_s: float = 5.0,
    command_timeout_s: float = 60.0,
    acquire_timeout_s: float | None = None,
) -> asyncpg.Pool:
    """A connection pool, retrying with backoff until PostgreSQL accepts connections;
    with ``acquire_timeout_s``, a :class:`BoundedPool`."""
    attempt = 0
    while True:
        try:
            if acquire_timeout_s is None:
                pool = await asyncpg.create_pool(
                    dsn, min_size=1, max_size=size, init=init, command_timeout=command_timeout_s
                )
            else:  # asyncpg.create_pool's defaults, spelled out for the subclass
                pool = await BoundedPool(
                    dsn, acquire_timeout_s=acquire_timeout_s, min_size=1, max_size=size,
                    max_queries=50_000, max_inactive_connection_lifetime=300.0, setup=None,
                    init=init, loop=None, connection_class=asyncpg.Connection,
                    record_class=asyncpg.Record, command_timeout=command_timeout_s)
            assert pool is not None
            return pool
        except DATABASE_ERRORS as exc:
            attempt += 1
            temporary = as_temporary(exc, attempt=attempt, cap_s=retry_max_s, connecting=True)
            if temporary is None:
                raise
            log.warning("database_connect_failed", attempt=attempt,
                        retry_in_s=round(temporary.delay, 2),
                        error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(temporary.delay)


async def close_pool(pool: asyncpg.Pool, timeout_s: float = 5.0) -> None:
    """Close gracefully within ``timeout_s``, else terminate (never hang a shutdown)."""
    try:
        await asyncio.wait_for(pool.close(), timeout=timeout_s)
    except Exception:
        pool.terminate()
