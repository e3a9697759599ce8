"""Run a throwaway (or persistent) PostgreSQL cluster as a child process.

This is the storage half of the embedded runtime: ``edgesync up`` and the
integration tests use it when no external PostgreSQL is configured. It runs
the real server binaries found on the machine, on 127.0.0.1 and a free port,
with password authentication (``scram-sha-256``) for every connection, TCP and
socket alike: another local user cannot walk in. Each cluster gets its own
generated password, set in single-user mode before the server first listens
and kept in ``<data_dir>/edgesync.password`` (0600); the DSNs carry it. A
cluster made by an older edgesync (trust) is switched over the same way on its
next start.

Start-up is kept fast by never running ``initdb`` twice: the first cluster
created on a machine is copied, before its first start, into a pristine
template under ``~/.cache/edgesync/pg-template-<major>`` (or
``$EDGESYNC_PG_TEMPLATE_DIR``), and later clusters are copies of it. The
template holds no password and is never started; every copy gets its own.

PostgreSQL refuses to run as root, so when we are root every server binary
runs as the unprivileged ``postgres`` OS user (created as ``edgesync-pg`` if
absent), and the data directory is owned by it.

``postgres`` is run directly as our child (no ``pg_ctl``), so its pid is the
postmaster's and chaos tests can SIGKILL it. Like :mod:`broker.runtime.embedded_nats`
the process is a plain :class:`subprocess.Popen`, polled, so an instance may
be started in one event loop and stopped in another.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Self, TypedDict
from urllib.parse import quote

import asyncpg
import structlog

from broker.errors import ClosedError, RuntimeUnavailable
from broker.runtime.processes import child_pids, die_with_parent

__all__ = [
    "DEFAULT_DATABASE",
    "DISTRO_ROOT",
    "INSTALL_HINT",
    "EmbeddedPostgres",
    "find_postgres_bindir",
    "redact_dsn",
    "server_os_group",
    "template_dir_for",
]

log = structlog.get_logger(__name__)

INSTALL_HINT = (
    "install the PostgreSQL server: `apt-get install postgresql` on Debian/Ubuntu, "
    "`dnf install postgresql-server` on Fedora/RHEL, `brew install postgresql` on macOS"
)
DISTRO_ROOT = Path("/usr/lib/postgresql")  # Debian/Ubuntu: /usr/lib/postgresql/<major>/bin
DEFAULT_DATABASE = "edgesync"

# initdb makes this superuser; the role named by ``user`` is created from it on
# first start. A fixed name lets one cached template serve every ``user``.
_BOOTSTRAP_USER = "postgres"
_FALLBACK_OS_USER = "edgesync-pg"
_LOG_TAIL_CHARS = 4000  # enough of the server log to explain a failed start
_POLL_INTERVAL = 0.01  # seconds between readiness / exit checks
_PORT_ATTEMPTS = 5  # a port picked by binding to 0 can be taken before postgres binds it
_PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>
_PORT_CLASH_MARKS = ("could not create any TCP/IP sockets", "Address already in use")
_PASSWORD_FILE = "edgesync.password"
_PG_HBA = """\
# Written by edgesync (broker/runtime/embedded_postgres.py): passwords, always.
local   all  all                 scram-sha-256
host    all  all  127.0.0.1/32   scram-sha-256
host    all  all  ::1/128        scram-sha-256
"""


def redact_dsn(dsn: str) -> str:
    """``dsn`` with its password replaced by ``***``, for logs and terminals."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", dsn)


def find_postgres_bindir(*, path: str | None = None, distro_root: Path = DISTRO_ROOT) -> Path:
    """Locate the directory holding ``initdb`` and ``postgres``.

    Searched in order: ``initdb`` on ``path`` (default ``$PATH``), the bindir
    reported by ``pg_config --bindir`` found on ``path``, then the newest
    ``<distro_root>/<major>/bin``.

    Raises:
        RuntimeUnavailable: no usable server binaries; the message says what to
            install.
    """
    candidates: list[Path] = []
    if initdb := shutil.which("initdb", path=path):
        candidates.append(Path(initdb).resolve().parent)  # Debian symlinks initdb into /usr/bin
    if pg_config := shutil.which("pg_config", path=path):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    candidates.extend(
        sorted(distro_root.glob("*/bin"), key=lambda p: _version_key(p.parent.name), reverse=True)
    )
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in ("initdb", "postgres")):
            return bindir
    searched = ", ".join(str(c) for c in candidates) or "nothing found"
    raise RuntimeUnavailable(
        f"PostgreSQL server binaries (initdb, postgres) not found on PATH, via pg_config, "
        f"or under {distro_root}/*/bin (checked: {searched}); {INSTALL_HINT}"
    )


def template_dir_for(major: str) -> Path:
    """Where the pristine initdb'ed template for server ``major`` is cached."""
    if override := os.environ.get("EDGESYNC_PG_TEMPLATE_DIR"):
        return Path(override)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "edgesync" / f"pg-template-{major}"


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name)) or (-1,)


@functools.lru_cache(maxsize=8)
def _server_major(bindir: Path) -> str:
    out = subprocess.run(
        [str(bindir / "postgres"), "-V"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    # "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    if match is None:
        raise RuntimeUnavailable(f"cannot parse the version of {bindir / 'postgres'}: {out!r}")
    return match[1]


@dataclass(frozen=True)
class _OsUser:
    """The unprivileged account the server runs as when we are root."""

    name: str
    uid: int
    gid: int

    def can_search(self, directory: Path) -> bool:
        st = directory.stat()
        if st.st_uid == self.uid:
            return bool(st.st_mode & stat.S_IXUSR)
        if st.st_gid in os.getgrouplist(self.name, self.gid):
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)

    def chown_tree(self, root: Path) -> None:
        os.chown(root, self.uid, self.gid)
        for dirpath, dirnames, filenames in os.walk(root):
            for name in (*dirnames, *filenames):
                os.lchown(os.path.join(dirpath, name), self.uid, self.gid)


def server_os_group() -> int | None:
    """The group id of the OS user the server runs as when that is not us (we are
    root), else None: a directory that must hold a cluster gives it search rights."""
    user = _server_os_user()
    return None if user is None else user.gid


def _server_os_user() -> _OsUser | None:
    """None when we are not root (the server then runs as us)."""
    if os.geteuid() != 0:
        return None
    for name in (_BOOTSTRAP_USER, _FALLBACK_OS_USER):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return _OsUser(pw.pw_name, pw.pw_uid, pw.pw_gid)
    useradd = shutil.which("useradd") or shutil.which("useradd", path="/usr/sbin:/sbin")
    if useradd is None:
        raise RuntimeUnavailable(
            "running as root, PostgreSQL needs an unprivileged OS user, and neither "
            f"'{_BOOTSTRAP_USER}' exists nor is useradd available to create "
            f"'{_FALLBACK_OS_USER}'; run as a normal user or create one of those users"
        )
    proc = subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", _FALLBACK_OS_USER],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    try:
        pw = pwd.getpwnam(_FALLBACK_OS_USER)  # also covers a concurrent useradd winning the race
    except KeyError:
        raise RuntimeUnavailable(
            f"could not create OS user {_FALLBACK_OS_USER} for PostgreSQL: {proc.stderr.strip()}"
        ) from None
    log.info("postgres_os_user_created", os_user=_FALLBACK_OS_USER, uid=pw.pw_uid)
    return _OsUser(pw.pw_name, pw.pw_uid, pw.pw_gid)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _set_child_subreaper(enabled: bool) -> bool:
    """prctl(PR_SET_CHILD_SUBREAPER); False where unsupported (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _reap(pids: list[int], *, deadline: float) -> bool:
    """Wait until every pid is gone, reaping those that are our children."""
    pending = set(pids)
    while pending:
        for pid in list(pending):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    pending.discard(pid)
            except ChildProcessError:  # not ours (no subreaper): a zombie elsewhere is fine
                if _is_gone(pid):
                    pending.discard(pid)
        if not pending:
            break
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)
    return True


def _is_gone(pid: int) -> bool:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat_line.rsplit(")", 1)[1].split()[0] in ("Z", "X")  # zombies hold no resources


class _Credentials(TypedDict):
    """Popen arguments selecting the OS user a server binary runs as."""

    user: int | None
    group: int | None
    extra_groups: list[int] | None


@dataclass
class _Run:
    """One incarnation of the postmaster."""

    proc: subprocess.Popen[bytes]
    port: int
    socket_dir: Path
    log_fh: IO[bytes]
    log_offset: int  # where this run's output starts in the log file


class EmbeddedPostgres:
    """A PostgreSQL cluster run as a child process; an async context manager.

    Args:
        data_dir: cluster directory. If it already holds a cluster
            (``PG_VERSION`` exists) it is reused; otherwise one is created
            there (from the cached template when present).
        port: TCP port on 127.0.0.1; 0 picks a free one on first start.
            Restarts reuse the port of the first start.
        user: superuser role the :attr:`dsn` connects as; created if missing,
            and owner of the ``edgesync`` database.
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
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0..65535, got {port}")
        self._data_dir = Path(data_dir).absolute()
        self._port = port
        self._user = user
        self._fsync = fsync
        self._synchronous_commit = fsync if synchronous_commit is None else synchronous_commit
        self._ephemeral = ephemeral
        self._start_timeout = start_timeout
        self._run: _Run | None = None
        self._real_dir: Path | None = None  # data_dir, or where it points when relocated
        self._relocated = False
        self._created = False  # this instance ran initdb / copied the template
        self.source: str | None = None
        """Where the running cluster came from: ``initdb``, ``template`` (a copy of the
        cached initdb template) or ``existing`` (the data directory already held it)."""
        self._closed = False
        self._os_user: _OsUser | None = None
        self._bindir: Path | None = None
        self._password: str | None = None

    # -- properties -------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        """The cluster directory given to the constructor."""
        return self._data_dir

    @property
    def port(self) -> int:
        """TCP port; known once the server has started at least once."""
        if self._port == 0:
            raise RuntimeError("EmbeddedPostgres has not started yet; its port is not known")
        return self._port

    @property
    def pid(self) -> int | None:
        """Pid of the running postmaster, or None when it is not running."""
        if self._run is None or self._run.proc.poll() is not None:
            return None
        return self._run.proc.pid

    @property
    def running(self) -> bool:
        """True while the postmaster is alive."""
        return self.pid is not None

    @property
    def user(self) -> str:
        """The superuser role the DSNs connect as."""
        return self._user

    @property
    def dsn(self) -> str:
        """DSN of the ``edgesync`` database, e.g. ``postgresql://edgesync@127.0.0.1:5432/edgesync``."""
        return self.dsn_for(DEFAULT_DATABASE)

    @property
    def log_file(self) -> Path:
        """The server's log (inside the cluster directory)."""
        return (self._real_dir or self._data_dir) / "log" / "postgres.log"

    @property
    def password(self) -> str:
        """The cluster's generated password (of :attr:`user` and the bootstrap role)."""
        if self._password is None:
            raise RuntimeError("EmbeddedPostgres has not started yet; its password is not known")
        return self._password

    def dsn_for(self, dbname: str) -> str:
        """DSN of database ``dbname`` on this cluster, as :attr:`user`, with its password."""
        user, db = quote(self._user, safe=""), quote(dbname, safe="")
        password = quote(self.password, safe="")
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{db}"

    def __repr__(self) -> str:
        port = self._port or "?"
        return f"<EmbeddedPostgres 127.0.0.1:{port} pid={self.pid} data_dir={self._data_dir}>"

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
            self._os_user = await asyncio.to_thread(_server_os_user)
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
                self._kill_cluster(run)
                _release(run)
                raise
            self._run = run
            self._port = port
            break
        log.info(
            "postgres_started",
            dsn=redact_dsn(self.dsn),
            pid=self.pid,
            data_dir=str(self._data_dir),
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
        run = self._run
        if run is None:
            return
        self._run = None
        proc = run.proc
        started = time.monotonic()
        forced = False
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT if mode == "fast" else signal.SIGQUIT)
                deadline = started + timeout
                while proc.poll() is None:
                    if time.monotonic() >= deadline:
                        forced = True
                        self._kill_cluster(run)
                        break
                    await asyncio.sleep(_POLL_INTERVAL)
        except BaseException:
            self._kill_cluster(run)  # cancelled mid-wait: do not leave the server behind
            _release(run)
            raise
        _release(run)
        log.info(
            "postgres_stopped",
            pid=proc.pid,
            mode=mode,
            returncode=proc.returncode,
            forced=forced,
            seconds=round(time.monotonic() - started, 3),
        )

    async def kill(self) -> None:
        """SIGKILL the postmaster and all its children now, as a host crash would.

        Only the processes of this cluster are signalled, by pid. On the next
        start PostgreSQL runs crash recovery.
        """
        run = self._run
        if run is None:
            return
        self._run = None
        self._kill_cluster(run)
        _release(run)
        log.info("postgres_killed", pid=run.proc.pid, returncode=run.proc.returncode)

    async def restart(self) -> None:
        """Stop (if running) and start again on the same port and data dir."""
        await self.stop()
        await self.start()

    async def close(self) -> None:
        """Stop the server and, if ephemeral and created here, delete the cluster."""
        if self._closed:
            return
        try:
            await self.stop()
        finally:
            self._closed = True
            if self._ephemeral and self._created:
                await asyncio.to_thread(self._remove_cluster)

    async def create_database(self, name: str) -> str:
        """Create database ``name`` owned by :attr:`user` and return its DSN."""
        if not self.running:
            raise RuntimeError(f"{self!r} is not running")
        conn = await self._connect(self._user, "postgres")
        try:
            await conn.execute(
                f"CREATE DATABASE {_quote_ident(name)} "
                f"OWNER {_quote_ident(self._user)} TEMPLATE template0"
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

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- internals: cluster directory ---------------------------------------------------------

    def _prepare_cluster(self, bindir: Path) -> str:
        """Make sure the data dir holds a cluster with a password; return where it
        came from. Blocking."""
        source = self._prepare_cluster_dir(bindir)
        assert self._real_dir is not None
        self._secure_cluster(bindir, self._real_dir)
        return source

    def _secure_cluster(self, bindir: Path, real: Path) -> None:
        """Give the cluster a password and password-only pg_hba.conf, once; load it."""
        password_file = real / _PASSWORD_FILE
        if password_file.exists():
            self._password = password_file.read_text().strip()
            return
        password = secrets.token_urlsafe(24)  # URL-safe: goes into DSNs as is
        # Single-user mode reads SQL on stdin and opens no socket: the password is
        # set before the server ever listens, and never appears on a command line.
        try:
            proc = subprocess.run(
                [str(bindir / "postgres"), "--single", "-D", str(real),
                 # A fresh cluster holds nothing yet: its shutdown checkpoint need not
                 # fsync (the template copy is not fsynced either); seconds on a busy disk.
                 "-c", "fsync=off", "-c", "full_page_writes=off", _BOOTSTRAP_USER],
                input=f"ALTER ROLE {_quote_ident(_BOOTSTRAP_USER)} PASSWORD '{password}';\n",
                capture_output=True, text=True, timeout=120, check=False, cwd="/",
                env=_child_env(), **self._as_server_user(),
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeUnavailable(f"postgres --single failed to run: {exc}") from exc
        if proc.returncode != 0 or "ERROR" in proc.stdout + proc.stderr:
            output = (proc.stdout + proc.stderr)[-_LOG_TAIL_CHARS:]
            raise RuntimeUnavailable(f"setting the cluster password failed:\n{output}")
        hba = real / "pg_hba.conf"
        hba.write_text(_PG_HBA)
        if self._os_user is not None:
            os.chown(hba, self._os_user.uid, self._os_user.gid)
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
        self._password = password
        log.info("postgres_password_set", data_dir=str(real))

    def _prepare_cluster_dir(self, bindir: Path) -> str:
        if self._real_dir is not None and (self._real_dir / "PG_VERSION").exists():
            return "existing"
        data_dir = self._data_dir
        if (data_dir / "PG_VERSION").exists():
            self._real_dir = data_dir.resolve()
            return "existing"
        if data_dir.exists() and any(data_dir.iterdir()):
            raise RuntimeUnavailable(
                f"{data_dir} is not empty and holds no PostgreSQL cluster (no PG_VERSION); "
                "point data_dir at an empty or missing directory"
            )
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        real = self._make_cluster_dir(data_dir).resolve()
        self._real_dir = real
        self._created = True
        major = _server_major(bindir)
        template = template_dir_for(major)
        if _is_template(template, major):
            shutil.copytree(template, real, symlinks=True, dirs_exist_ok=True)
            if self._os_user is not None:
                self._os_user.chown_tree(real)
            real.chmod(0o700)
            return "template"
        self._initdb(bindir, real)
        _save_template(real, template)
        return "initdb"

    def _make_cluster_dir(self, data_dir: Path) -> Path:
        user = self._os_user
        blocked = (
            None
            if user is None
            else next((p for p in reversed(data_dir.parents) if not user.can_search(p)), None)
        )
        if user is not None and blocked is not None:
            # e.g. pytest's tmp_path lives under a 0700 /tmp/pytest-of-root: the
            # server user cannot reach it. An ephemeral cluster can live elsewhere
            # behind a symlink; a persistent one must not silently move to /tmp.
            if not self._ephemeral:
                raise RuntimeUnavailable(
                    f"PostgreSQL runs as OS user {user.name!r}, which cannot reach {data_dir} "
                    f"({blocked} is not searchable by it); choose a data dir under a path "
                    f"{user.name!r} can traverse"
                )
            real = Path(tempfile.mkdtemp(prefix="edgesync-pg-"))
            if data_dir.exists():
                data_dir.rmdir()  # checked empty above
            data_dir.symlink_to(real, target_is_directory=True)
            self._relocated = True
            log.info("postgres_data_dir_relocated", data_dir=str(data_dir), real_dir=str(real))
        else:
            data_dir.mkdir(exist_ok=True)
            real = data_dir
        if user is not None:
            os.chown(real, user.uid, user.gid)
        real.chmod(0o700)
        return real

    def _initdb(self, bindir: Path, real: Path) -> None:
        started = time.monotonic()
        try:
            proc = subprocess.run(
                [str(bindir / "initdb"), "-D", str(real), "-U", _BOOTSTRAP_USER,
                 "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
                capture_output=True, text=True, timeout=120, check=False, cwd="/",
                env=_child_env(), **self._as_server_user(),
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeUnavailable(f"initdb failed to run: {exc}") from exc
        if proc.returncode != 0:
            output = (proc.stdout + proc.stderr)[-_LOG_TAIL_CHARS:]
            raise RuntimeUnavailable(f"initdb exited with code {proc.returncode}:\n{output}")
        log.info(
            "postgres_initdb", data_dir=str(real), seconds=round(time.monotonic() - started, 3)
        )

    def _remove_cluster(self) -> None:
        if self._real_dir is not None:
            shutil.rmtree(self._real_dir, ignore_errors=True)
        if self._relocated:
            with contextlib.suppress(FileNotFoundError):
                self._data_dir.unlink()
        log.info("postgres_cluster_removed", data_dir=str(self._data_dir))

    # -- internals: server process ------------------------------------------------------------

    def _as_server_user(self) -> _Credentials:
        user = self._os_user
        if user is None:
            return {"user": None, "group": None, "extra_groups": None}
        # extra_groups=[] drops root's supplementary groups in the child.
        return {"user": user.uid, "group": user.gid, "extra_groups": []}

    def _spawn(self, bindir: Path, port: int) -> _Run:
        assert self._real_dir is not None
        socket_dir = Path(tempfile.mkdtemp(prefix="edgesync-pgsock-"))
        log_path = self._real_dir / "log" / "postgres.log"
        log_path.parent.mkdir(exist_ok=True)
        log_fh = log_path.open("ab")
        if self._os_user is not None:
            for path in (socket_dir, log_path.parent, log_path):
                os.chown(path, self._os_user.uid, self._os_user.gid)
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(socket_dir),
            "max_connections": "200",
            "shared_buffers": "128MB",
        }
        if not self._fsync:
            settings |= {"fsync": "off", "full_page_writes": "off"}
        if not self._synchronous_commit:
            settings["synchronous_commit"] = "off"
        args = [str(bindir / "postgres"), "-D", str(self._real_dir), "-p", str(port)]
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
                env=_child_env(),
                # Own session: a terminal's Ctrl-C reaches us, not the server, so
                # shutdown stays ordered (we stop it, with deadlines).
                start_new_session=True,
                **self._as_server_user(),
            )
        except OSError as exc:
            log_fh.close()
            shutil.rmtree(socket_dir, ignore_errors=True)
            raise RuntimeUnavailable(f"cannot execute {args[0]}: {exc}") from exc
        return _Run(proc, port, socket_dir, log_fh, log_offset=log_fh.tell())

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
                conn = await self._connect(
                    _BOOTSTRAP_USER, "postgres", port=run.port, timeout=min(remaining, 2.0)
                )
            except (OSError, TimeoutError, asyncpg.CannotConnectNowError,
                    asyncpg.PostgresConnectionError):  # fmt: skip
                await asyncio.sleep(_POLL_INTERVAL)
                continue
            except asyncpg.PostgresError as exc:
                # e.g. no role "postgres": a reused cluster not made by this class.
                raise RuntimeUnavailable(
                    f"cannot connect to the cluster in {self._real_dir} as its bootstrap "
                    f"superuser {_BOOTSTRAP_USER!r}: {exc}"
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
        assert self._real_dir is not None
        served = await conn.fetchval("SELECT current_setting('data_directory')")
        if served != str(self._real_dir):  # both as passed to -D: absolute, resolved
            raise RuntimeUnavailable(
                f"port {self._port} is served by another PostgreSQL (data_directory={served})"
            )
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", self._user):
            await conn.execute(f"CREATE ROLE {_quote_ident(self._user)} SUPERUSER LOGIN")
        # Every start: a role made before passwords (or renamed user) gets this one.
        await conn.execute(f"ALTER ROLE {_quote_ident(self._user)} PASSWORD '{self.password}'")
        if not await conn.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", DEFAULT_DATABASE
        ):
            await conn.execute(
                f"CREATE DATABASE {_quote_ident(DEFAULT_DATABASE)} OWNER {_quote_ident(self._user)}"
            )

    async def _connect(
        self, user: str, database: str, *, port: int | None = None, timeout: float = 10.0
    ) -> asyncpg.Connection:
        return await asyncpg.connect(
            host="127.0.0.1",
            port=port or self._port,
            user=user,
            password=self._password,
            database=database,
            ssl=False,  # the server has no TLS; do not let PGSSLMODE from the env interfere
            timeout=timeout,
        )

    def _log_tail(self, run: _Run) -> str:
        try:
            with self.log_file.open("rb") as fh:
                fh.seek(max(run.log_offset, fh.seek(0, os.SEEK_END) - _LOG_TAIL_CHARS))
                return fh.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"

    def _kill_cluster(self, run: _Run) -> None:
        """SIGKILL the postmaster and its children, by pid, and reap them. Bounded.

        PostgreSQL children call setsid(), so a process-group kill would miss
        them. Stopping the postmaster first freezes the set of children: it
        cannot fork more, nor reap the ones we kill, so their pids cannot be
        reused under us. While the postmaster dies we are a child subreaper,
        so its killed children are reparented to us and we reap them; left to
        an init that does not reap (as in many containers) they would linger
        as zombies.
        """
        proc = run.proc
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGSTOP)
        children = child_pids(proc.pid)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        adopting = bool(children) and _set_child_subreaper(True)
        try:
            proc.kill()
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - only a stuck kernel gets here
            log.error("postgres_kill_timeout", pid=proc.pid)
        finally:
            if adopting:
                _set_child_subreaper(False)  # adopted children stay ours until reaped
        # Wait for the children too: one still attached to shared memory would
        # make the next start refuse the data directory.
        if not _reap(children, deadline=time.monotonic() + 5.0):
            log.error("postgres_children_outlived_kill", pid=proc.pid, children=children)


class _PortClash(Exception):
    """The server could not bind its port; the caller may pick another."""


def _release(run: _Run) -> None:
    run.log_fh.close()
    shutil.rmtree(run.socket_dir, ignore_errors=True)


def _child_env() -> dict[str, str]:
    # A clean environment: PG* variables of an outer setup must not leak into
    # the server, and C locale keeps log messages parseable (port clashes).
    env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C", "LANG": "C"}
    if tz := os.environ.get("TZ"):
        env["TZ"] = tz
    return env


def _is_template(template: Path, major: str) -> bool:
    try:
        return (template / "PG_VERSION").read_text().strip() == major and (
            template / "global" / "pg_control"
        ).is_file()
    except OSError:
        return False


def _save_template(cluster: Path, template: Path) -> None:
    """Copy a fresh, never-started cluster to the template cache; best effort."""
    staging = template.with_name(f".{template.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(cluster, staging, symlinks=True)
        # Atomic publish: concurrent creators race harmlessly, readers never see
        # a half-copied template.
        staging.rename(template)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if not _is_template(template, (cluster / "PG_VERSION").read_text().strip()):
            log.warning("postgres_template_not_saved", template=str(template), error=str(exc))
        return
    log.info("postgres_template_saved", template=str(template))
