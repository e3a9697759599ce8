"""Which database errors are an outage to wait out (:func:`as_temporary`)."""

from __future__ import annotations

import asyncpg

from broker.errors import TemporaryError
from cloud_ingest.db_errors import DATABASE_ERRORS, as_temporary, is_contention


def test_a_connection_left_mid_operation_is_an_outage_every_loop_waits_out() -> None:
    """asyncpg raises InternalClientError from a connection whose protocol was cut in
    the middle of an operation when PostgreSQL was killed: every loop that catches
    DATABASE_ERRORS must take it, and it is temporary (the API's republish loop once
    let it end the service, and with it `edgesync up`)."""
    exc = asyncpg.InternalClientError(
        "cannot switch to state 11; another operation (2) is in progress")
    assert isinstance(exc, DATABASE_ERRORS)
    temporary = as_temporary(exc, attempt=2)
    assert isinstance(temporary, TemporaryError)
    assert temporary.__cause__ is exc


def test_a_refusal_is_not_an_outage() -> None:
    assert as_temporary(asyncpg.UniqueViolationError("duplicate key")) is None


def test_the_databases_own_faults_are_an_outage_not_the_groups() -> None:
    """Class 58 (an I/O error, a relation file gone), the corruption PostgreSQL detects
    (XX001, XX002), a database that takes no writes (25006) or refuses our role (class
    28, 3D000, 42501) are waited out; an internal error (XX000) may come from a value,
    so it is not."""
    for exc in (asyncpg.PostgresIOError("could not read block 7: Input/output error"),
                asyncpg.UndefinedFileError('could not open file "base/1/2"'),
                asyncpg.DataCorruptedError("invalid page in block 3"),
                asyncpg.IndexCorruptedError("index contains unexpected zero page"),
                asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only "
                                                    "transaction"),
                asyncpg.InvalidPasswordError('password authentication failed for user "x"'),
                asyncpg.InvalidCatalogNameError('database "edgesync" does not exist'),
                asyncpg.InsufficientPrivilegeError("permission denied for table records")):
        assert isinstance(as_temporary(exc), TemporaryError), exc
    assert as_temporary(asyncpg.InternalServerError("unexpected")) is None


def test_transactions_in_each_others_way_are_retried_not_blamed_on_the_group() -> None:
    """A deadlock (40P01), a serialization failure (40001) or a lock not granted within
    lock_timeout (55P03) is temporary and says "busy", not "unavailable"; a deferred
    constraint's rollback (40002) is about the data, so it is not."""
    for exc in (asyncpg.DeadlockDetectedError("deadlock detected"),
                asyncpg.SerializationError("could not serialize access"),
                asyncpg.LockNotAvailableError("canceling statement due to lock timeout")):
        assert is_contention(exc), exc
        temporary = as_temporary(exc)
        assert isinstance(temporary, TemporaryError), exc
        assert str(temporary).startswith("database busy: "), temporary
    rollback = asyncpg.TransactionIntegrityConstraintViolationError("deferred check")
    assert not is_contention(rollback)
    assert as_temporary(rollback) is None
    assert str(as_temporary(OSError("refused"))).startswith("database unavailable: ")
