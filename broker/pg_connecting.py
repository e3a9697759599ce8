"""One PostgreSQL connection for the length of an ``async with`` block.

asyncpg's :func:`asyncpg.connect` returns a connection that is not a context
manager, so every short-lived use wrote ``connect`` / ``try`` / ``finally: close``.
:func:`connected` is that shape once: the connection is closed when the block
ends, whatever happened inside (the block's exception propagates). Long-lived
users hold a pool instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

__all__ = ["connected"]


@contextlib.asynccontextmanager
async def connected(dsn: str, **options: Any) -> AsyncIterator[asyncpg.Connection]:
    """A connection to ``dsn`` (``options`` go to :func:`asyncpg.connect`), closed on exit."""
    conn = await asyncpg.connect(dsn, **options)
    try:
        yield conn
    finally:
        await conn.close()
