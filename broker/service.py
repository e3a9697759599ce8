"""The one service skeleton: lifecycle and root-task supervision for bridge, ingest and API.

A service is an async context manager that owns its resources (sockets, NATS,
pools, files) and a ``serve(stop, ready)`` coroutine that runs its root tasks::

    async with Ingest(settings, nats_settings) as ingest:   # Service: open, or roll back
        await ingest.serve(stop)                            # Supervisor: roots end together

:class:`Service` gives each one the same lifecycle (:class:`Lifecycle`):
``new -> starting -> open -> closing -> closed``. A start that fails half-way
closes whatever it had opened before the error propagates, ``close()`` is
idempotent, and a service starts once (reopening raises :class:`ClosedError`).
Every listener is bound with :func:`broker.serving.listen_tcp`.

:class:`Supervisor` is kopf's reactor in small: the first root task to end
(a crash, or a return nobody asked for) stops the others, the service's own
ordered shutdown runs within a hard deadline, and that root's error is
re-raised, so a process whose root crashed exits non-zero instead of looking
like a clean stop to Kubernetes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, ClassVar, Self

import structlog

from broker.errors import ClosedError, RootTaskEnded
from broker.serving import listen_tcp

__all__ = [
    "SHUTDOWN_DEADLINE_S",
    "Lifecycle",
    "Service",
    "Supervisor",
]

log = structlog.get_logger(__name__)

SHUTDOWN_DEADLINE_S = 20.0
"""Default hard bound on an ordered shutdown; below Kubernetes' 30 s grace period."""


class Lifecycle(enum.Enum):
    """Where a service stands; it only ever moves forward."""

    NEW = "new"
    STARTING = "starting"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Service:
    """Base of a long-running service: start once, roll back a failed start, close once.

    Subclasses implement :meth:`_open` (acquire resources in order) and
    :meth:`_close` (release whatever was acquired, in the order that keeps data
    safe; it must cope with a start that stopped half-way).
    """

    kind: ClassVar[str] = "service"
    """Name used in messages and log events (``bridge``, ``ingest``, ``api``)."""

    def __init__(self) -> None:
        self.state = Lifecycle.NEW
        self._sock: socket.socket | None = None

    async def serve(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Run the service's root tasks until ``stop`` is set (sets ``ready`` once up)."""
        raise NotImplementedError

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """A service process's whole life: open, serve until ``stop`` is set, close; a
        crashed root task is re-raised (``edgesync bridge|ingest|api``)."""
        async with self:
            await self.serve(stop, ready)

    async def __aenter__(self) -> Self:
        if self.state is not Lifecycle.NEW:
            raise ClosedError(f"{self.kind} is {self.state.value}; a {self.kind} starts once")
        self.state = Lifecycle.STARTING
        try:
            with self.bound_log_context():
                await self._open()
        except BaseException:
            await self.close()  # roll back: everything opened so far is released
            raise
        self.state = Lifecycle.OPEN
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Release everything this service holds; idempotent."""
        if self.state in (Lifecycle.CLOSING, Lifecycle.CLOSED):
            return
        self.state = Lifecycle.CLOSING
        try:
            with self.bound_log_context():
                await self._close()
        finally:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            self.state = Lifecycle.CLOSED

    def log_context(self) -> dict[str, str]:
        """Fields every log line of this service carries (the bridge: its ``edge``)."""
        return {}

    def bound_log_context(self) -> contextlib.AbstractContextManager[None]:
        """Bind :meth:`log_context` through structlog's contextvars for a block.

        Tasks started inside the block copy the context, so their lines carry it too;
        leaving the block restores the caller's context (several services can share
        one event loop, as tests and ``edgesync up`` do).
        """
        return structlog.contextvars.bound_contextvars(**self.log_context())

    async def _open(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    def _listen(self, host: str, port: int) -> socket.socket:
        """Bind this service's HTTP listener (closed by :meth:`close`)."""
        self._sock = listen_tcp(host, port)
        return self._sock

    @property
    def is_open(self) -> bool:
        return self.state is Lifecycle.OPEN

    @property
    def port(self) -> int:
        """The port the HTTP listener is bound to (useful when asked for port 0)."""
        if self._sock is None:
            raise ClosedError(f"{self.kind} has no listener: it is {self.state.value}")
        return int(self._sock.getsockname()[1])

    @property
    def listener(self) -> socket.socket:
        if self._sock is None:
            raise ClosedError(f"{self.kind} has no listener: use `async with` first")
        return self._sock


class Supervisor:
    """The root tasks of one service: the first to end stops them all.

    Use as an async context manager around the service's serving body::

        async with Supervisor("ingest", shutdown=ordered_shutdown) as roots:
            roots.start(consume_forever(), name="consume")
            ...
            await roots.wait(stop)

    On exit it runs ``shutdown`` (the service's ordered steps, which may await
    the roots it wants to finish) within ``deadline_s``, cancels whatever root is
    still running, and waits for all of them. If a root ended before ``stop``
    was set, its exception is re-raised (:class:`RootTaskEnded` when it
    returned or was cancelled by someone else).
    """

    def __init__(
        self,
        service: str,
        *,
        shutdown: Callable[[], Awaitable[None]] | None = None,
        deadline_s: float = SHUTDOWN_DEADLINE_S,
    ) -> None:
        self.service = service
        self.deadline_s = deadline_s
        self._shutdown = shutdown
        self._roots: list[asyncio.Task[None]] = []
        self._stopping = False
        self.culprit: asyncio.Task[None] | None = None
        """The root that ended first, unasked; None after a requested stop."""

    @property
    def roots(self) -> tuple[asyncio.Task[None], ...]:
        return tuple(self._roots)

    def start(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        """Start one root task."""
        task = asyncio.create_task(coro, name=f"{self.service}:{name}")
        self._roots.append(task)
        return task

    def on_shutdown(self, shutdown: Callable[[], Awaitable[None]]) -> None:
        """Set the service's ordered shutdown (when it needs the root tasks it started)."""
        self._shutdown = shutdown

    async def wait(self, stop: asyncio.Event) -> None:
        """Return once ``stop`` is set or a root task has ended, whichever comes first."""
        stopper = asyncio.create_task(stop.wait(), name=f"{self.service}:stop-wait")
        try:
            await asyncio.wait([stopper, *self._roots], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        self._note_culprit()

    def _note_culprit(self) -> None:
        if self.culprit is not None or self._stopping:
            return
        ended = [t for t in self._roots if t.done()]
        if not ended:
            return
        self.culprit = task = ended[0]
        error = _outcome(task)
        log.error("root_task_ended", service=self.service, task=task.get_name(),
                  error=repr(error))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._note_culprit()
        self._stopping = True
        try:
            if self._shutdown is not None:
                try:
                    await asyncio.wait_for(self._shutdown(), timeout=self.deadline_s)
                except TimeoutError:
                    log.error("shutdown_deadline_exceeded", service=self.service,
                              deadline_s=self.deadline_s)
                except Exception as error:
                    log.error("shutdown_failed", service=self.service, error=repr(error))
        finally:
            await self._cancel_all()
        if exc is None and self.culprit is not None:
            raise _outcome(self.culprit)

    async def _cancel_all(self) -> None:
        for task in self._roots:
            task.cancel()
        results = await asyncio.gather(*self._roots, return_exceptions=True)
        for task, result in zip(self._roots, results, strict=True):
            if task is not self.culprit and isinstance(result, Exception):
                log.error("root_task_failed", service=self.service, task=task.get_name(),
                          error=repr(result))


def _outcome(task: asyncio.Task[None]) -> BaseException:
    """What a root that ended on its own means: its exception, or that it ended at all."""
    if task.cancelled():
        return RootTaskEnded(f"root task {task.get_name()} was cancelled")
    error = task.exception()
    if error is not None:
        return error
    return RootTaskEnded(f"root task {task.get_name()} returned; it should run until stopped")
