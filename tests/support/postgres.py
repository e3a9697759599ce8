"""The PostgreSQL server tests run against, and DSNs for it.

:class:`PgCluster` is what the ``pg_cluster`` fixture yields: either an
external server described by ``PG*`` environment variables or an embedded one.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import asyncpg

from broker.pg_connecting import connected
from broker.runtime.embedded_postgres import EmbeddedPostgres

__all__ = [
    "PgCluster", "database_setting", "dsn_from_env", "end_other_sessions", "retrying_deadlocks",
    "waiting_on_a_lock",
]


async def waiting_on_a_lock(observer: asyncpg.Connection, pid: int) -> bool:
    """Whether backend ``pid`` waits on a lock now, as ``observer`` sees it: the way
    race tests know the interleaving they arrange happened (not by timing)."""
    return bool(await observer.fetchval(
        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid))


async def retrying_deadlocks(step: Callable[[], Awaitable[None]], attempts: int = 5) -> None:
    """Run ``step`` (a transaction of its own), again when PostgreSQL ends it as a
    deadlock's victim: what a test's stand-in for an operator (a restore that locks
    tables while the ingest commits) does, as the operator would."""
    for attempt in range(attempts):
        try:
            await step()
            return
        except asyncpg.DeadlockDetectedError:
            if attempt == attempts - 1:
                raise


def dsn_from_env(env: Mapping[str, str] | None = None) -> str:
    """Build a DSN for the maintenance database from libpq ``PG*`` variables.

    Uses PGHOST (a host name, or a socket directory starting with ``/``),
    PGPORT, PGUSER, PGPASSWORD, PGDATABASE (default ``postgres``) and PGSSLMODE.
    """
    env = os.environ if env is None else env
    host = env["PGHOST"]
    port = env.get("PGPORT") or "5432"
    auth = quote(env.get("PGUSER") or getpass.getuser(), safe="")
    if password := env.get("PGPASSWORD"):
        auth += ":" + quote(password, safe="")
    query: dict[str, str] = {}
    if host.startswith("/"):
        netloc = f"{auth}@"
        query |= {"host": host, "port": port}
    else:
        bracketed = f"[{host}]" if ":" in host else host
        netloc = f"{auth}@{bracketed}:{port}"
    if sslmode := env.get("PGSSLMODE"):
        query["sslmode"] = sslmode
    path = "/" + quote(env.get("PGDATABASE") or "postgres", safe="")
    return urlunsplit(("postgresql", netloc, path, urlencode(query), ""))


@dataclass(frozen=True)
class PgCluster:
    """A PostgreSQL server tests may create databases on.

    Attributes:
        admin_dsn: DSN of a maintenance database, as a role allowed to create
            and drop databases.
        embedded: the embedded cluster, or None for an external server.
    """

    admin_dsn: str
    embedded: EmbeddedPostgres | None = None

    def dsn_for(self, dbname: str) -> str:
        """The admin DSN pointed at database ``dbname``."""
        parts = urlsplit(self.admin_dsn)
        return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))

    @contextlib.asynccontextmanager
    async def fresh_database(self) -> AsyncIterator[str]:
        """DSN of a fresh, empty database ``t_<12 hex>``, dropped on exit."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        async with connected(self.admin_dsn) as conn:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        try:
            yield self.dsn_for(name)
        finally:
            async with connected(self.admin_dsn) as conn:
                # FORCE: a test that leaked a connection must not leak the database too.
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def end_other_sessions(conn: asyncpg.Connection) -> None:
    """End every other client session of ``conn``'s role on its database (its services
    reconnect); background workers such as autovacuum's are not the role's to end."""
    await conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND backend_type = 'client backend' AND usename = current_user")


@contextlib.asynccontextmanager
async def database_setting(conn: asyncpg.Connection, name: str, value: str
                           ) -> AsyncIterator[None]:
    """``ALTER DATABASE … SET name = 'value'`` on ``conn``'s database for the block, as a
    DBA would: every other session is ended first, so that the services reconnect with
    it. Reset on exit (sessions opened meanwhile keep it until they reconnect)."""
    database = await conn.fetchval("SELECT current_database()")
    await conn.execute(f"ALTER DATABASE \"{database}\" SET {name} = '{value}'")
    try:
        await end_other_sessions(conn)
        yield
    finally:
        await conn.execute(f'ALTER DATABASE "{database}" RESET {name}')
