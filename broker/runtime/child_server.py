"""What the embedded servers share: one child process at a time, run and stopped by pid.

:class:`~broker.runtime.embedded_nats.EmbeddedNats` and
:class:`~broker.runtime.embedded_postgres.EmbeddedPostgres` each run a server
binary as a plain :class:`subprocess.Popen`, polled, so an instance may be
started in one event loop and stopped in another. Both learn their port on the
first start and keep it across restarts (clients hold the URL), both know the
pid of the running incarnation (a *run*), and both stop it the same way:
signal, wait with a deadline, kill (:func:`stop_process`). This module is the
one home of those rules; each server keeps what is its own (how it starts, how
it is killed, what ``close`` removes).
"""

from __future__ import annotations

import abc
import asyncio
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Final, Generic, Protocol, TypeVar

from broker.opening import Opened

__all__ = ["ChildServer", "stop_process"]

_POLL_S: Final = 0.01
"""Seconds between looks at a stopping child: servers exit within tens of ms."""


class _Run(Protocol):
    """One incarnation of a server: at least its process."""

    @property
    def proc(self) -> subprocess.Popen[bytes]: ...


RunT = TypeVar("RunT", bound=_Run)


async def stop_process(
    proc: subprocess.Popen[bytes],
    sig: signal.Signals,
    *,
    timeout: float,
    kill: Callable[[], None],
) -> bool:
    """Send ``sig`` to ``proc`` and wait up to ``timeout`` seconds for it to exit,
    then call ``kill``.

    Cancelled (or failing) while it waits, it calls ``kill`` before re-raising:
    a stop never leaves the server behind.

    Returns:
        Whether the server had to be killed.
    """
    try:
        if proc.poll() is None:
            proc.send_signal(sig)  # by pid (Popen), never by name
            deadline = time.monotonic() + timeout
            while proc.poll() is None:
                if time.monotonic() >= deadline:
                    kill()
                    return True
                await asyncio.sleep(_POLL_S)
    except BaseException:
        kill()
        raise
    return False


class ChildServer(abc.ABC, Opened, Generic[RunT]):
    """A server run as a child process; an async context manager (start, then close).

    Subclasses set ``_port`` (0 until the first start picked one), ``_run``
    (the running incarnation, or None) and ``_host`` when it is not loopback,
    and implement :meth:`start`, :meth:`stop` and ``_data``.
    """

    _host = "127.0.0.1"
    _port: int
    _run: RunT | None

    @property
    def port(self) -> int:
        """The port clients connect to; known once the server has started at least once."""
        if self._port == 0:
            raise RuntimeError(f"{type(self).__name__} has not started yet; its port is not known")
        return self._port

    @property
    def pid(self) -> int | None:
        """Pid of the running server, or None when it is not running."""
        if self._run is None or self._run.proc.poll() is not None:
            return None
        return self._run.proc.pid

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self.pid is not None

    def __repr__(self) -> str:
        port = self._port or "?"
        return f"<{type(self).__name__} {self._host}:{port} pid={self.pid} {self._data()}>"

    @abc.abstractmethod
    def _data(self) -> str:
        """Where the server keeps its data, for :func:`repr`: ``name=path``."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the server and wait until it serves."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop the server within a deadline; idempotent."""

    async def restart(self) -> None:
        """Stop (if running) and start again on the same port and data."""
        await self.stop()
        await self.start()

    async def open(self) -> None:
        """``async with`` starts the server (:meth:`start`)."""
        await self.start()

    async def close(self) -> None:
        """Stop the server and release what this instance holds."""
        await self.stop()

    def _take_run(self) -> RunT | None:
        """The running incarnation, forgotten here: the caller stops or kills it."""
        run, self._run = self._run, None
        return run

