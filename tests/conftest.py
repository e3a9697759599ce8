"""Fixtures that start the real servers on free ports.

- ``nats_server``: a fresh ``nats-server -js`` per test, in ``tmp_path``.
- ``pg_cluster``: one PostgreSQL for the whole session: the external server
  described by ``PG*`` variables when ``PGHOST`` is set, else an embedded
  throwaway cluster.
- ``pg_dsn``: a fresh database per test on that cluster, dropped afterwards.
- ``migrated_conn``: a connection to ``pg_dsn`` after the ingest's migrations ran.
- ``reachable_dir``: a temporary directory an unprivileged PostgreSQL server user
  can traverse, for what keeps a persistent cluster (``edgesync up``'s state).

A test still running after 300 s gets its threads' and tasks' stacks printed
(:mod:`tests.support.hang_report`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from broker.pg_connecting import connected
from broker.runtime.embedded_nats import EmbeddedNats
from broker.runtime.embedded_postgres import EmbeddedPostgres
from cloud_ingest.schema import migrate
from tests.support import PgCluster, dsn_from_env
from tests.support.hang_report import pytest_runtest_protocol  # noqa: F401  # a hook


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """A running nats-server with JetStream, its store and log in ``tmp_path``."""
    async with EmbeddedNats(tmp_path / "nats-store", log_file=tmp_path / "nats.log") as server:
        yield server


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgCluster]:
    """The session's PostgreSQL: external if ``PGHOST`` is set, else embedded.

    A sync fixture driving its own short event loops: EmbeddedPostgres is not
    tied to a loop, and this keeps the session fixture independent of the
    per-test loops pytest-asyncio creates.
    """
    if os.environ.get("PGHOST"):
        yield PgCluster(admin_dsn=dsn_from_env())
        return
    # Its role makes a database per test; otherwise it is `edgesync up`'s: no superuser.
    cluster = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data", may_create_databases=True)
    asyncio.run(cluster.start())
    try:
        yield PgCluster(admin_dsn=cluster.dsn_for("postgres"), embedded=cluster)
    finally:
        asyncio.run(cluster.close())


@pytest.fixture
async def pg_dsn(pg_cluster: PgCluster) -> AsyncIterator[str]:
    """DSN of a fresh, empty database ``t_<12 hex>`` that is dropped after the test."""
    async with pg_cluster.fresh_database() as dsn:
        yield dsn


@pytest.fixture
async def migrated_conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to ``pg_dsn`` with the schema migrated, closed after the test."""
    async with connected(pg_dsn) as conn:
        await migrate(conn)
        yield conn


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """As root, the embedded server runs as another OS user, and a persistent cluster
    (``edgesync up`` keeps its state) must live where that user can reach it; pytest's
    ``tmp_path`` is under a 0700 directory."""
    path = Path(tempfile.mkdtemp(prefix="edgesync-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
