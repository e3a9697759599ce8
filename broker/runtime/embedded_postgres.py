"""Run a throwaway (or persistent) PostgreSQL cluster as a child process.

This is the storage half of the embedded runtime: ``edgesync up`` and the
integration tests use it when no external PostgreSQL is configured. It runs
the real server binaries found on the machine, on 127.0.0.1 and a free port,
with password authentication for every connection; the DSNs carry the
cluster's password. This module is the server's lifecycle (start on a free
port, ready-wait, bootstrap of the role and database, stop, kill, close); the
rest of the embedded PostgreSQL has a room each under :mod:`broker.runtime`:

- ``postgres_binaries``: finding ``initdb``/``postgres``, running them;
- ``postgres_os_user``: the unprivileged OS user when we are root;
- ``postgres_cluster``: the cluster directory (reused, copied, initdb'ed, removed);
- ``postgres_template``: the initdb template cache (``initdb`` runs once per machine);
- ``postgres_securing``: the generated password and password-only ``pg_hba.conf``.

``postgres`` is run directly as our child (no ``pg_ctl``), so its pid is the
postmaster's and chaos tests can SIGKILL it. Like :mod:`broker.runtime.embedded_nats`
it is a :class:`~broker.runtime.child_server.ChildServer`: a plain
:class:`subprocess.Popen`, polled, so an instance may be started in one event
loop and stopped in another.

It re-exports what importers found here before the split (``find_postgres_bindir``,
``template_dir_for``, ``server_os_group``, ``INSTALL_HINT``, ``DISTRO_ROOT``): the
``x as x`` imports mark them for ``mypy --strict``; their homes are the rooms above.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, Literal, Self
from urllib.parse import quote

import asyncpg
import structlog

from broker.errors import ClosedError, RuntimeUnavailable
from broker.runtime.child_server import ChildServer, stop_process
from broker.runtime.postgres_binaries import DISTRO_ROOT as DISTRO_ROOT  # noqa: PLC0414
from broker.runtime.postgres_binaries import INSTALL_HINT as INSTALL_HINT  # noqa: PLC0414
from broker.runtime.postgres_binaries import OUTPUT_TAIL_CHARS, server_env
from broker.runtime.postgres_binaries import find_postgres_bindir as find_postgres_bindir  # noqa: PLC0414
from broker.runtime.postgres_cluster import ClusterDir, ClusterSource
from broker.runtime.postgres_os_user import OsUser, credentials, server_os_user
from broker.runtime.postgres_os_user import server_os_group as server_os_group  # noqa: PLC0414
from broker.runtime.postgres_securing import (
    BOOTSTRAP_USER,
    app_password,
    quote_ident,
    secure_cluster,
)
from broker.runtime.postgres_template import template_dir_for as template_dir_for  # noqa: PLC0414
from broker.runtime.processes import die_with_parent, kill_with_children

__all__ = ["DEFAULT_DATABASE", "EmbeddedPostgres", "redact_dsn"]

log = structlog.get_logger(__name__)

DEFAULT_DATABASE: Final = "edgesync"
_POLL_INTERVAL: Final = 0.01  # seconds between readiness checks
_PORT_ATTEMPTS: Final = 5  # a port picked by binding to 0 can be taken before postgres binds it
_PORT_CLASH_MARKS: Final = ("could not create any TCP/IP sockets", "Address already in use")


def redact_dsn(dsn: str) -> str:
    """``dsn`` with its password replaced by ``***``, for logs and terminals."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", dsn)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class _Run:
    """One incarnation of the postmaster."""

    proc: subprocess.Popen[bytes]
    port: int
    log_fh: IO[bytes]
    log_offset: int  # where this run's output starts in the log file


class EmbeddedPostgres(ChildServer[_Run]):
    """A PostgreSQL cluster run as a child process; an async context manager.

    Args:
        data_dir: cluster directory. If it already holds a cluster
            (``PG_VERSION`` exists) it is reused; otherwise one is created
            there (from the cached template when present).
        port: TCP port on 127.0.0.1; 0 picks a free one on first start.
            Restarts reuse the port of the first start.
        user: the role the :attr:`dsn` connects as; created if missing, owner of the
            ``edgesync`` database and of what it creates there, but no superuser (the
            bootstrap superuser, with a password of its own, only makes it). A role
            made superuser by an older edgesync is demoted on start.
        may_create_databases: give :attr:`user` ``CREATEDB`` and ``pg_signal_backend``
            (the tests' cluster makes a database per test as that role and drops it
            ``WITH (FORCE)``); :meth:`create_database` needs neither.
        superuser: make :attr:`user` a superuser after all: only for tooling that
            needs it (the bench's ``--pg-statements`` creates and resets
            ``pg_stat_statements``), never for the services.
        fsync: False (the default, for tests) sets ``fsync``,
            ``full_page_writes`` and ``synchronous_commit`` off.
        synchronous_commit: override for ``synchronous_commit``; None follows
            ``fsync``. Pass True for kill -9 tests that check committed rows:
            with it off a commit is acknowledged before its WAL leaves shared
            memory, so killing the server loses the last few hundred ms of
            acknowledged commits. (``fsync=off`` alone is safe against a
            process kill, only not against an OS crash.)
        ephemeral: remove the data directory on close, but only if this
            instance created the cluster; an existing cluster is never deleted.
        start_timeout: seconds to wait for the server to accept connections.
        settings: further server settings (``-c name=value``), applied after the
            defaults above (the bench's ``--pg-statements`` preloads an extension).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int = 0,
        user: str = "edgesync",
        fsync: bool = False,
        synchronous_commit: bool | None = None,
        ephemeral: bool = True,
        start_timeout: float = 10.0,
        settings: Mapping[str, str] | None = None,
        may_create_databases: bool = False,
        superuser: bool = False,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0..65535, got {port}")
        self._cluster = ClusterDir(data_dir, ephemeral=ephemeral)
        self._port = port
        self._user = user
        self._fsync = fsync
        self._synchronous_commit = fsync if synchronous_commit is None else synchronous_commit
        self._ephemeral = ephemeral
        self._start_timeout = start_timeout
        self._settings = dict(settings or {})
        self._may_create_databases = may_create_databases
        self._superuser = superuser
        self._run: _Run | None = None
        self.source: ClusterSource | None = None
        """Where the running cluster came from: ``initdb``, ``template`` (a copy of the
        cached initdb template) or ``existing`` (the data directory already held it)."""
        self._closed = False
        self._os_user: OsUser | None = None
        self._bindir: Path | None = None
        self._password: str | None = None
        """The bootstrap superuser's (never in a DSN this class hands out)."""
        self._app_password: str | None = None

    # -- properties -------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        """The cluster directory given to the constructor."""
        return self._cluster.data_dir

    @property
    def user(self) -> str:
        """The role the DSNs connect as (owner of the ``edgesync`` database, no superuser)."""
        return self._user

    @property
    def dsn(self) -> str:
        """DSN of the ``edgesync`` database, e.g. ``postgresql://edgesync@127.0.0.1:5432/edgesync``."""
        return self.dsn_for(DEFAULT_DATABASE)

    @property
    def log_file(self) -> Path:
        """The server's log (inside the cluster directory)."""
        return (self._cluster.real or self._cluster.data_dir) / "log" / "postgres.log"

    @property
    def password(self) -> str:
        """The generated password of :attr:`user` (the bootstrap superuser has its own)."""
        if self._app_password is None:
            raise RuntimeError("EmbeddedPostgres has not started yet; its password is not known")
        return self._app_password

    def dsn_for(self, dbname: str) -> str:
        """DSN of database ``dbname`` on this cluster, as :attr:`user`, with its password."""
        user, db = quote(self._user, safe=""), quote(dbname, safe="")
        password = quote(self.password, safe="")
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{db}"

    def _data(self) -> str:
        return f"data_dir={self.data_dir}"

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the cluster if needed, start the server, and wait until it serves.

        Raises:
            RuntimeUnavailable: binaries missing, initdb failed, or the server
                exited or did not accept connections within ``start_timeout``
                (the message carries the tail of its log).
            ClosedError: the instance was closed.
            RuntimeError: the server is already running.
        """
        if self._closed:
            raise ClosedError(f"{self!r} is closed; make a new EmbeddedPostgres")
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        started = time.monotonic()
        if self._bindir is None:
            self._bindir = await asyncio.to_thread(find_postgres_bindir)
            self._os_user = await asyncio.to_thread(server_os_user)
        source = self.source = await asyncio.to_thread(self._prepare_cluster, self._bindir)
        prepared = time.monotonic()
        auto_port = self._port == 0
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = _free_port() if auto_port else self._port
            run = self._spawn(self._bindir, port)
            try:
                await self._wait_ready(run, deadline=prepared + self._start_timeout)
            except _PortClash:
                _release(run)
                if auto_port and attempt < _PORT_ATTEMPTS:
                    log.info("postgres_port_clash", port=port, attempt=attempt)
                    continue
                raise RuntimeUnavailable(
                    f"PostgreSQL could not bind 127.0.0.1:{port}: address already in use"
                ) from None
            except BaseException:
                # Failed or cancelled start: leave no server behind.
                _kill_cluster(run)
                _release(run)
                raise
            self._run = run
            self._port = port
            break
        log.info(
            "postgres_started",
            dsn=redact_dsn(self.dsn),
            pid=self.pid,
            data_dir=str(self.data_dir),
            cluster_source=source,
            prepare_seconds=round(prepared - started, 3),
            seconds=round(time.monotonic() - started, 3),
        )

    async def stop(
        self, mode: Literal["fast", "immediate"] = "fast", timeout: float = 10.0
    ) -> None:
        """Shut the server down; SIGKILL it if it outlives ``timeout`` s.

        ``fast`` rolls back open transactions and checkpoints; ``immediate``
        skips the checkpoint (crash recovery runs on the next start).
        Idempotent: stopping a stopped server does nothing.
        """
        run = self._take_run()
        if run is None:
            return
        started = time.monotonic()
        sig = signal.SIGINT if mode == "fast" else signal.SIGQUIT
        try:
            forced = await stop_process(
                run.proc, sig, timeout=timeout, kill=lambda: _kill_cluster(run)
            )
        finally:
            _release(run)
        log.info(
            "postgres_stopped",
            pid=run.proc.pid,
            mode=mode,
            returncode=run.proc.returncode,
            forced=forced,
            seconds=round(time.monotonic() - started, 3),
        )

    async def kill(self) -> None:
        """SIGKILL the postmaster and all its children now, as a host crash would.

        Only the processes of this cluster are signalled, by pid. On the next
        start PostgreSQL runs crash recovery.
        """
        run = self._take_run()
        if run is None:
            return
        _kill_cluster(run)
        _release(run)
        log.info("postgres_killed", pid=run.proc.pid, returncode=run.proc.returncode)

    async def close(self) -> None:
        """Stop the server and, if ephemeral and created here, delete the cluster."""
        if self._closed:
            return
        try:
            await self.stop()
        finally:
            self._closed = True
            if self._ephemeral and self._cluster.created:
                await asyncio.to_thread(self._cluster.remove)

    async def create_database(self, name: str) -> str:
        """Create database ``name`` owned by :attr:`user` and return its DSN."""
        if not self.running:
            raise RuntimeError(f"{self!r} is not running")
        conn = await self._connect_as_bootstrap("postgres")
        try:
            await conn.execute(
                f"CREATE DATABASE {quote_ident(name)} "
                f"OWNER {quote_ident(self._user)} TEMPLATE template0"
            )
        finally:
            await conn.close()
        return self.dsn_for(name)

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            # __aexit__ will not run: remove a half-made ephemeral cluster here.
            await asyncio.shield(self.close())
            raise
        return self

    # -- internals: cluster directory ---------------------------------------------------------

    def _prepare_cluster(self, bindir: Path) -> ClusterSource:
        """Make sure the data dir holds a cluster with a password; return where it
        came from. Blocking."""
        source = self._cluster.prepare(bindir, self._os_user)
        assert self._cluster.real is not None
        self._password = secure_cluster(bindir, self._cluster.real, self._os_user)
        self._app_password = app_password(self._cluster.real)
        return source

    # -- internals: server process ------------------------------------------------------------

    def _spawn(self, bindir: Path, port: int) -> _Run:
        real = self._cluster.real
        assert real is not None
        log_path = real / "log" / "postgres.log"
        log_path.parent.mkdir(exist_ok=True)
        log_fh = log_path.open("ab")
        if self._os_user is not None:
            self._os_user.chown(log_path.parent, log_path)
        settings = {
            "listen_addresses": "127.0.0.1",
            # TCP on loopback only: no Unix socket (nothing of ours connects through
            # one), so none to guard and no directory left behind in /tmp when a
            # run is killed before it can clean up.
            "unix_socket_directories": "",
            "max_connections": "200",
            "shared_buffers": "128MB",
        }
        if not self._fsync:
            settings |= {"fsync": "off", "full_page_writes": "off"}
        if not self._synchronous_commit:
            settings["synchronous_commit"] = "off"
        settings |= self._settings
        args = [str(bindir / "postgres"), "-D", str(real), "-p", str(port)]
        for name, value in settings.items():
            args += ["-c", f"{name}={value}"]
        try:
            proc = subprocess.Popen(
                # If we die without stopping it, it stops too: fast shutdown.
                [*die_with_parent(signal.SIGINT), *args],
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                cwd="/",
                env=server_env(),
                # Own session: a terminal's Ctrl-C reaches us, not the server, so
                # shutdown stays ordered (we stop it, with deadlines).
                start_new_session=True,
                **credentials(self._os_user),
            )
        except OSError as exc:
            log_fh.close()
            raise RuntimeUnavailable(f"cannot execute {args[0]}: {exc}") from exc
        return _Run(proc, port, log_fh, log_offset=log_fh.tell())

    async def _wait_ready(self, run: _Run, *, deadline: float) -> None:
        while True:
            code = run.proc.poll()
            if code is not None:
                tail = self._log_tail(run)
                if any(mark in tail for mark in _PORT_CLASH_MARKS):
                    raise _PortClash
                raise RuntimeUnavailable(
                    f"postgres exited with code {code} during start-up:\n{tail}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeUnavailable(
                    f"postgres did not accept connections within {self._start_timeout}s:\n"
                    f"{self._log_tail(run)}"
                )
            try:
                conn = await self._connect_as_bootstrap(
                    "postgres", port=run.port, timeout=min(remaining, 2.0)
                )
            except (OSError, TimeoutError, asyncpg.CannotConnectNowError,
                    asyncpg.PostgresConnectionError):  # fmt: skip
                await asyncio.sleep(_POLL_INTERVAL)
                continue
            except asyncpg.PostgresError as exc:
                # e.g. no role "postgres": a reused cluster not made by this class.
                raise RuntimeUnavailable(
                    f"cannot connect to the cluster in {self._cluster.real} as its bootstrap "
                    f"superuser {BOOTSTRAP_USER!r}: {exc}"
                ) from exc
            try:
                await self._bootstrap(conn)
            except asyncpg.PostgresError as exc:
                raise RuntimeUnavailable(f"postgres started but bootstrap failed: {exc}") from exc
            finally:
                await conn.close()
            return

    async def _bootstrap(self, conn: asyncpg.Connection) -> None:
        """Check we reached our own server; create the role and database if missing."""
        served = await conn.fetchval("SELECT current_setting('data_directory')")
        if served != str(self._cluster.real):  # both as passed to -D: absolute, resolved
            raise RuntimeUnavailable(
                f"port {self._port} is served by another PostgreSQL (data_directory={served})"
            )
        if self._user == BOOTSTRAP_USER:
            raise RuntimeUnavailable(
                f"the services' role cannot be the bootstrap superuser {BOOTSTRAP_USER!r}")
        # Least privilege: the owner of its database, nothing more. Every start, so that a
        # role made by an older edgesync (a superuser, sharing the superuser's password)
        # is demoted and gets its own password.
        rights = ("LOGIN " + ("SUPERUSER" if self._superuser else "NOSUPERUSER")
                  + " NOCREATEROLE NOREPLICATION NOBYPASSRLS "
                  + ("CREATEDB" if self._may_create_databases else "NOCREATEDB"))
        role = quote_ident(self._user)
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", self._user):
            await conn.execute(f"CREATE ROLE {role} {rights}")
        await conn.execute(f"ALTER ROLE {role} WITH {rights} PASSWORD '{self.password}'")
        signal = bool(await conn.fetchval(  # membership itself (a superuser is "member" of all)
            "SELECT 1 FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member "
            "WHERE r.rolname = $1 AND m.roleid = 'pg_signal_backend'::regrole", self._user))
        if signal != self._may_create_databases:
            grant = (f"GRANT pg_signal_backend TO {role}" if self._may_create_databases
                     else f"REVOKE pg_signal_backend FROM {role}")
            await conn.execute(grant)
        if not await conn.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", DEFAULT_DATABASE
        ):
            await conn.execute(
                f"CREATE DATABASE {quote_ident(DEFAULT_DATABASE)} OWNER {quote_ident(self._user)}"
            )

    async def _connect_as_bootstrap(
        self, database: str, *, port: int | None = None, timeout: float = 10.0
    ) -> asyncpg.Connection:
        return await asyncpg.connect(
            host="127.0.0.1",
            port=port or self._port,
            user=BOOTSTRAP_USER,
            password=self._password,
            database=database,
            ssl=False,  # the server has no TLS; do not let PGSSLMODE from the env interfere
            timeout=timeout,
        )

    def _log_tail(self, run: _Run) -> str:
        try:
            with self.log_file.open("rb") as fh:
                fh.seek(max(run.log_offset, fh.seek(0, os.SEEK_END) - OUTPUT_TAIL_CHARS))
                return fh.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"


def _kill_cluster(run: _Run) -> None:
    """SIGKILL the postmaster and its backends, by pid, and reap them; bounded.

    The backends call setsid(), so a process-group kill would miss them; one
    still attached to shared memory would make the next start refuse the data
    directory (see :func:`~broker.runtime.processes.kill_with_children`).
    """
    if not kill_with_children(run.proc):
        log.error("postgres_children_outlived_kill", pid=run.proc.pid)


class _PortClash(Exception):
    """The server could not bind its port; the caller may pick another."""


def _release(run: _Run) -> None:
    run.log_fh.close()
