"""Narrowing a refused write down to the items PostgreSQL refuses.

One home for *what counts as a refusal of the data* (as opposed to an outage,
which is retried whole): :data:`REJECTED`. The record writer bisects rows with
it (:mod:`cloud_ingest.writing`); the events consumer uses :func:`write_each`
so a malformed event is dead-lettered alone and the valid ones around it are
stored.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import asyncpg

from broker.errors import InvalidInput
from cloud_ingest.db_errors import Connection

__all__ = ["REFUSED_BY_POSTGRES", "REJECTED", "refusal", "write_each"]

T = TypeVar("T")
R = TypeVar("R")

REFUSED_BY_POSTGRES: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
    # PL/pgSQL refusing the row: a trigger's RAISE EXCEPTION (P0001), a failed ASSERT, a
    # STRICT lookup that found no row or several. A rule of the operator's, as a CHECK
    # is; taken for an unexpected failure, it dead-lettered the row's whole batch.
    asyncpg.exceptions.PLPGSQLError,
)
"""What PostgreSQL answers when it refuses the data of a statement (not the
connection, not the transaction's timing)."""
REJECTED: tuple[type[BaseException], ...] = (
    InvalidInput,  # a writer's own refusal (cloud_ingest.key_limits), reason as raised
    *REFUSED_BY_POSTGRES,
    OverflowError,  # a value the client-side codecs cannot encode
    ValueError,
    TypeError,
)
"""What makes PostgreSQL (or asyncpg's encoding) refuse the data itself, not the
connection: worth narrowing down, never worth retrying as is."""


def refusal(exc: BaseException) -> str:
    """The dead-letter reason for a refusal."""
    if isinstance(exc, InvalidInput):
        return str(exc)
    return f"rejected by PostgreSQL: {type(exc).__name__}: {exc}"


async def write_each(
    conn: Connection,
    write: Callable[[Connection, list[T]], Awaitable[R]],
    items: Sequence[T],
) -> tuple[list[R], list[tuple[int, str]]]:
    """``write`` all ``items`` at once; if that is refused, each on its own.

    Each attempt runs in a savepoint of the caller's transaction, so a refused
    item leaves no trace. Returns the results of the successful writes and
    ``(index, reason)`` of each refused item.
    """
    try:
        async with conn.transaction():
            return [await write(conn, list(items))], []
    except REJECTED as exc:
        if len(items) == 1:
            return [], [(0, refusal(exc))]  # tried alone already
    results: list[R] = []
    refused: list[tuple[int, str]] = []
    for i, item in enumerate(items):
        try:
            async with conn.transaction():
                results.append(await write(conn, [item]))
        except REJECTED as exc:
            refused.append((i, refusal(exc)))
    return results, refused
