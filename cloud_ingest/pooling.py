"""PostgreSQL connection pools for the cloud services: wait for the database at
start-up, and release connections within a deadline at shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg
import structlog

from cloud_ingest.db_errors import DATABASE_ERRORS, as_temporary

__all__ = ["close_pool", "connect_pool"]

log = structlog.get_logger(__name__)


async def connect_pool(
    dsn: str,
    *,
    size: int,
    init: Callable[[asyncpg.Connection[asyncpg.Record]], Coroutine[Any, Any, None]]
    | None = None,
    retry_max_s: float = 5.0,
    command_timeout_s: float = 60.0,
) -> asyncpg.Pool:
    """A connection pool, retrying with backoff until PostgreSQL accepts connections."""
    attempt = 0
    while True:
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=1, max_size=size, init=init, command_timeout=command_timeout_s
            )
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
