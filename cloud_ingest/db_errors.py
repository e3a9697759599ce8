"""Where the cloud decides, once, whether a database error is worth retrying.

Every cloud call site that talks to PostgreSQL (the pool at start-up, the
records and events consumers, the operator API) hands a foreign error to
:func:`as_temporary`: a database that is unavailable (connection refused or
lost, starting up, shutting down, out of connections, a timeout, its disk full,
its files failing, taking no writes, or refusing our role) or busy (a deadlock, a
serialization failure, a lock not granted within ``lock_timeout``: see
:func:`is_contention`) becomes :class:`~broker.errors.TemporaryError` whose
``delay`` is :func:`broker.backoff.backoff_s` for the attempt; anything else
(the database answered, and said no) is not temporary and yields None.

It also holds :data:`Connection`, the one name for "a connection, pooled or not".
"""

from __future__ import annotations

import asyncpg

from broker.backoff import backoff_s
from broker.errors import TemporaryError

__all__ = ["DATABASE_ERRORS", "Connection", "as_temporary", "is_contention"]

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
"""A connection, whether pooled or not."""

DATABASE_ERRORS: tuple[type[Exception], ...] = (
    OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
"""Every error a database call may raise (what call sites catch before classifying)."""

_UNAVAILABLE: tuple[type[Exception], ...] = (
    OSError,  # refused, reset, unreachable
    TimeoutError,  # connect or command timeout
    asyncpg.InterfaceError,  # the connection is closed or was lost mid-call
    # A connection whose protocol was left mid-operation when the server went away
    # ("cannot switch to state 11; another operation (2) is in progress"): the API's
    # republish loop, not catching it, ended `edgesync up` when PostgreSQL was killed.
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # starting up, shutting down, admin shutdown
    asyncpg.InsufficientResourcesError,  # too many connections, disk full
    # The server's own files or OS failing (class 58: an I/O error, a relation file gone
    # with a lost volume or a partial restore) and corruption it detected (XX001 data,
    # XX002 index): the database's fault, never the group's. Taken for the group's, they
    # had the ingest bisect every group and dead-letter good records one by one.
    asyncpg.PostgresSystemError,
    asyncpg.DataCorruptedError,
    asyncpg.IndexCorruptedError,
    # A database that takes no writes: a standby behind the DSN during a failover, or
    # default_transaction_read_only. Wait for a primary; the groups are not at fault.
    asyncpg.ReadOnlySQLTransactionError,
    # The database refusing us, not the data: a password rotated on the server only
    # (class 28), the database gone (3D000), a privilege revoked (42501). An operator
    # mends it; until then wait, as for an outage, instead of failing every group.
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.InsufficientPrivilegeError,
)

_CONTENTION: tuple[type[Exception], ...] = (
    # Transactions in each other's way, never the data's fault: PostgreSQL rolled one
    # back (a deadlock, 40P01; a serialization failure, 40001, under a stricter
    # default_transaction_isolation) or a lock was not granted within a lock_timeout
    # a DBA set (55P03), say while a maintenance statement held the table. Counted as
    # the group's failures, they had the ingest bisect good groups and dead-letter
    # their records one by one while the lock was held.
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.LockNotAvailableError,
)


def is_contention(exc: BaseException) -> bool:
    """True when ``exc`` says other transactions were in the way (the database is up:
    retry the same work, do not report an outage)."""
    return isinstance(exc, _CONTENTION)


def as_temporary(
    exc: BaseException, *, attempt: int = 1, cap_s: float = 5.0, connecting: bool = False
) -> TemporaryError | None:
    """Classify a database error.

    Args:
        exc: what the database call raised.
        attempt: how many times in a row this call has failed (1 for the first).
        cap_s: the longest delay to suggest.
        connecting: the error came from opening connections at start-up, where
            any server-side refusal may still clear (the database or its role
            is being created): then every database error is temporary.

    Returns:
        A :class:`TemporaryError` (``raise ... from exc`` it, or sleep its
        ``delay``) when retrying may succeed, else None.
    """
    busy = is_contention(exc)
    retryable = busy or isinstance(exc, _UNAVAILABLE) or (
        connecting and isinstance(exc, asyncpg.PostgresError)
    )
    if not retryable:
        return None
    what = "busy" if busy else "unavailable"
    error = TemporaryError(f"database {what}: {type(exc).__name__}: {exc}",
                           delay=backoff_s(attempt, cap_s=cap_s))
    error.__cause__ = exc
    return error
