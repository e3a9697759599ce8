"""The buffer's writer thread: one connection, group commit.

One thread owns the write connection. Every operation queued while the
previous transaction was committing goes into the next one (up to
:data:`MAX_GROUP`), so a single fsync covers many concurrent requests. Each
operation runs in its own savepoint: one that raises is rolled back alone (its
caller gets the error) and the rest of the group still commits. When the
commit itself fails (disk full, I/O error) every operation of the group fails
and the in-memory :class:`~edge_bridge.buffer.streams.StreamTable` is restored
to what the file holds.

Operations are functions of the connection; their results are resolved on the
caller's event loop. A caller that is cancelled does not cancel its operation:
it may still commit. An operation may register callbacks with :meth:`after_commit`:
they run on its event loop once its transaction committed, in commit order and
before any result of that transaction is resolved; never for an operation rolled
back (the committed tail, :mod:`~edge_bridge.buffer.tail`, is kept this way).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

import structlog

from broker.errors import BufferFull
from edge_bridge.buffer.streams import StreamTable

__all__ = [
    "DISK_FULL_RETRY_AFTER_S",
    "MAX_GROUP",
    "GroupWriter",
]

log = structlog.get_logger(__name__)
T = TypeVar("T")

MAX_GROUP: Final = 512
"""Most queued operations folded into one transaction."""


class _Op(Generic[T]):
    """One unit of work for the writer thread, resolved on the event loop."""

    __slots__ = ("fn", "future", "loop")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], T],
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[T],
    ) -> None:
        self.fn = fn
        self.loop = loop
        self.future = future


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class GroupWriter:
    """The writer thread of one buffer file."""

    def __init__(self, streams: StreamTable, *, name: str) -> None:
        self._streams = streams
        self._name = name
        self._ops: queue.SimpleQueue[_Op[Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._hooks: list[Callable[[], None]] = []
        """after_commit callbacks of the operation running now (writer thread only)."""
        self.commits = 0
        """Transactions committed (for the group-commit metric)."""

    async def start(self, open_connection: Callable[[], sqlite3.Connection]) -> None:
        """Start the thread; it opens its connection with ``open_connection``.

        Raises:
            Whatever ``open_connection`` raised (the thread has then ended).
        """
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(
            target=self._main, args=(loop, ready, open_connection), name=self._name, daemon=True
        )
        self._thread.start()
        await ready

    async def stop(self) -> None:
        """Finish every queued operation, then close the connection and end the thread."""
        self._ops.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def submit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in the next transaction; returns once that transaction committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._ops.put(_Op(fn, loop, future))
        # Shielded: a cancelled caller must not lose track of a write that may commit.
        return await asyncio.shield(future)

    def after_commit(self, callback: Callable[[], None]) -> None:
        """From inside an operation: run ``callback`` on the event loop once the
        transaction holding the operation committed (never if it is rolled back)."""
        self._hooks.append(callback)

    def _main(
        self,
        loop: asyncio.AbstractEventLoop,
        ready: asyncio.Future[None],
        open_connection: Callable[[], sqlite3.Connection],
    ) -> None:
        try:
            conn = open_connection()
        except BaseException as exc:
            loop.call_soon_threadsafe(_resolve, ready, None, exc)
            return
        loop.call_soon_threadsafe(_resolve, ready, None, None)
        stopping = False
        while not stopping:
            first = self._ops.get()
            group: list[_Op[Any]] = []
            if first is None:
                stopping = True
            else:
                group.append(first)
            while len(group) < MAX_GROUP:
                try:
                    nxt = self._ops.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    continue
                group.append(nxt)
            if group:
                self._run_group(conn, group)
        conn.close()

    def _run_group(self, conn: sqlite3.Connection, group: list[_Op[Any]]) -> None:
        results: list[tuple[_Op[Any], Any, BaseException | None]] = []
        hooks: list[tuple[asyncio.AbstractEventLoop, Callable[[], None]]] = []
        snapshot = self._streams.snapshot()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in group:
                conn.execute("SAVEPOINT op")
                op_snapshot = self._streams.snapshot()
                self._hooks = []
                try:
                    result = op.fn(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    self._streams.restore(op_snapshot)
                    results.append((op, None, _disk_full_as_buffer_full(exc)))
                else:
                    results.append((op, result, None))
                    hooks.extend((op.loop, hook) for hook in self._hooks)
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
            self.commits += 1
        except Exception as exc:  # the commit itself failed (disk full, I/O error)
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            self._streams.restore(snapshot)
            log.error("buffer_commit_failed", error=str(exc), ops=len(group))
            failure = _disk_full_as_buffer_full(exc)
            results = [(op, None, failure) for op in group]
            hooks = []
        self._hooks = []
        # One wake-up per event loop (each call_soon_threadsafe writes to the loop's
        # self-pipe), the hooks first: a caller resumes after what it committed is seen.
        done: dict[asyncio.AbstractEventLoop, list[Callable[[], None]]] = {}
        for loop, hook in hooks:
            done.setdefault(loop, []).append(hook)
        for op, result, error in results:
            done.setdefault(op.loop, []).append(
                functools.partial(_resolve, op.future, result, error))
        for loop, calls in done.items():
            loop.call_soon_threadsafe(_run_all, calls)


def _run_all(calls: list[Callable[[], None]]) -> None:
    for call in calls:
        try:
            call()
        except Exception:  # the rest (its callers' results) must still be delivered
            log.exception("buffer_after_commit_failed")


DISK_FULL_RETRY_AFTER_S: Final = 5.0
"""What a producer is told to wait when the buffer's filesystem is full: space comes
back when something else frees it, or when the cloud's watermark lets us trim."""


def _disk_full_as_buffer_full(exc: Exception) -> Exception:
    """The filesystem is full (SQLITE_FULL, ENOSPC): back-pressure, not a crash. The
    transaction was rolled back, so nothing of the request is stored and the producer
    may retry it; the writer goes on and succeeds as soon as space returns."""
    full = (isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == 13
            ) or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC)
    if not full:
        return exc
    error = BufferFull(f"the buffer's disk is full: {exc}", retry_after=DISK_FULL_RETRY_AFTER_S)
    error.__cause__ = exc
    return error
