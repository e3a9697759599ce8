"""Whether PostgreSQL answers at all, asked on a connection of its own.

The ingest learns of a database that refuses (connection refused, disk full...) from
its next write. A database that hangs instead (a frozen host, a path that drops
packets) refuses nothing: a write waits out its 60 s command timeout, and meanwhile
readiness stayed true and ``edgesync_ingest_db_up`` 1 while nothing committed (found
by stopping PostgreSQL with SIGSTOP under ``edgesync up``). A
:class:`DatabaseWatch` asks ``SELECT 1`` every ``interval_s`` on its own connection,
within ``timeout_s`` (the connect too), so that such a database shows within
``interval_s + timeout_s``. Its own connection, not one of the pool's: under a heavy
load every pooled connection may be busy with a long write, which is no outage.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import asyncpg
import structlog

__all__ = ["DatabaseWatch"]

log = structlog.get_logger(__name__)


class DatabaseWatch:
    """Asks PostgreSQL whether it answers, again and again (module docstring)."""

    def __init__(self, dsn: str, *, interval_s: float, timeout_s: float,
                 on_change: Callable[[bool], None]) -> None:
        """``on_change(answering)`` is called when the answer changes (not before the
        first failure: a database is taken to answer until it does not)."""
        self._dsn = dsn
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._on_change = on_change
        self._conn: asyncpg.Connection | None = None
        self._stopping = asyncio.Event()
        self.answering = True

    def begin_shutdown(self) -> None:
        """End :meth:`watch_forever` at once (the ingest's shutdown waits for its roots)."""
        self._stopping.set()

    async def watch_forever(self) -> None:
        """Ask every ``interval_s`` until :meth:`begin_shutdown`."""
        try:
            while not self._stopping.is_set():
                held = self._conn is not None
                error, hung = await self._ask()
                if error is not None and held and not hung:
                    # The connection held from before was ended meanwhile (an
                    # administrator's pg_terminate_backend, a setting applied by
                    # reconnecting): no outage by itself, so ask again on a new one.
                    error, hung = await self._ask()
                self._set(error is None, error=error or "")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=self._interval_s)
        finally:
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None

    async def _ask(self) -> tuple[str | None, bool]:
        """``SELECT 1`` on the watch's connection (made first if there is none): None if
        it answered, else why not (the connection is then dropped); and whether it
        timed out."""
        try:
            if self._conn is None:
                self._conn = await asyncpg.connect(self._dsn, timeout=self._timeout_s)
            await self._conn.fetchval("SELECT 1", timeout=self._timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a timeout, a refusal, a lost connection
            if self._conn is not None:
                self._conn.terminate()  # never wait on a server that does not answer
                self._conn = None
            if isinstance(exc, TimeoutError):
                return f"no answer within {self._timeout_s:g} s", True
            return f"{type(exc).__name__}: {exc}", False
        return None, False

    def _set(self, answering: bool, *, error: str = "") -> None:
        if answering == self.answering:
            return
        self.answering = answering
        if answering:
            log.info("database_answering")
        else:
            log.warning("database_not_answering", timeout_s=self._timeout_s, error=error)
        self._on_change(answering)
