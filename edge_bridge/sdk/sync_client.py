"""The synchronous SDK client: an :class:`EdgeClient` on a background event loop.

For applications without asyncio. A daemon thread runs an event loop that
hosts one :class:`EdgeClient`; any number of application threads call
:meth:`SyncEdgeClient.send` or :meth:`SyncEdgeClient.publish`, which validate
in the calling thread and hand the prepared record over through a deque,
without a lock (``_hand_over`` says why no record is lost, also to ``close``).
The loop is woken once per burst rather than once per record, and takes every
record handed over since in one go, which keeps the cross-thread cost per
record to a deque append; ``send`` adds nothing else per record.

The futures handed back are :class:`concurrent.futures.Future` objects that
share one condition variable per client instead of building their own: a
plain ``Future()`` costs a ``threading.Condition`` (an ``RLock`` and a deque)
to create and a lock round trip to resolve, which a profile showed to be half
of the synchronous client's cost per record. Their ``result()`` and
``exception()`` re-check their own state after every wake-up, so a wake-up
meant for another record of the same client is harmless.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures._base
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Final, Unpack

from broker.errors import ClosedError
from broker.protocol.wire import CT_JSON
from edge_bridge.sdk._batch import waiter_seqs
from edge_bridge.sdk._defaults import (
    DEFAULT_URL,
    WIRE_RECORD_OVERHEAD_BYTES,
    ClientOptions,
    Default,
)
from edge_bridge.sdk._records import OutRecord, plain_json
from edge_bridge.sdk.client import EdgeClient
from edge_bridge.sdk.results import ClientStats, RecordAck, SendFailed

__all__ = ["SyncEdgeClient"]

_Item = tuple[str, OutRecord, int, "_RecordFuture | None"]
_INTAKE_CHUNK: Final = 1024
"""Records an application thread hands over before it waits for the loop thread to take
them. Without the wait, a thread that publishes flat out holds the GIL, and the loop
thread may wait up to the switch interval (5 ms) to get it back after each socket call
(py-spy showed the socket write as the loop thread's hottest line in that case)."""
_INTAKE_WAIT_S: Final = 0.05
"""Longest such wait (a wake-up lost to a stopping loop costs no more than this)."""
_now_ns: Final = time.time_ns
_OVERHEAD: Final = WIRE_RECORD_OVERHEAD_BYTES
_PENDING: Final = concurrent.futures._base.PENDING
_FINISHED: Final = concurrent.futures._base.FINISHED
"""The states ``Future`` keeps in ``_state`` (the attribute-parity test covers them)."""


class _RecordFuture(concurrent.futures.Future[RecordAck]):
    """A ``concurrent.futures.Future`` sharing its client's condition (see the module
    docstring); it sets the same attributes ``Future.__init__`` does, and a unit
    test keeps the two lists equal across Python versions."""

    def __init__(self, condition: threading.Condition) -> None:  # no super(): that is the point
        self._condition = condition
        self._state = _PENDING
        self._result = None
        self._exception = None
        self._waiters = []
        self._done_callbacks: list[Callable[[concurrent.futures.Future[RecordAck]], object]] = []

    @staticmethod
    def resolve_all(futures: list[_RecordFuture], stream: str, epoch: int, first_seq: int,
                    gaps: list[tuple[int, int]] | None = None) -> None:
        """Resolve a batch's futures under one hold of their shared condition and with
        one notification (``set_result`` per future: a lock round trip and a
        notification each), then run their callbacks, as ``set_result`` would.
        A future the application cancelled keeps its state."""
        if not futures:
            return
        called: list[_RecordFuture] = []
        condition = futures[0]._condition
        seqs = waiter_seqs(len(futures), first_seq, gaps)
        with condition:
            for future, seq in zip(futures, seqs, strict=True):
                if future._state != _PENDING:
                    continue
                future._result = RecordAck(stream, epoch, seq)
                future._state = _FINISHED
                for waiter in future._waiters:
                    waiter.add_result(future)
                if future._done_callbacks:
                    called.append(future)
            condition.notify_all()
        for future in called:
            future._invoke_callbacks()  # type: ignore[attr-defined]  # Future's own

    def result(self, timeout: float | None = None) -> RecordAck:
        self._wait_done(timeout)
        return super().result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait_done(timeout)
        return super().exception(0)

    def _wait_done(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while not self.done():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError
                self._condition.wait(remaining)


class SyncEdgeClient:
    """Thread-safe synchronous client; same arguments and semantics as :class:`EdgeClient`
    (``url`` and the keyword :class:`~edge_bridge.sdk._defaults.ClientOptions`).

    ``publish`` returns a :class:`concurrent.futures.Future`; its ``result()``
    returns once the record is durable at the bridge. ``send`` is the same
    without the future (fire-and-forget; failures counted, logged and raised by
    ``flush``/``close`` as :class:`SendFailed`), and costs less. Use it as a
    context manager, or call :meth:`close`: records not yet flushed when the process
    exits are lost, since the loop runs in a daemon thread. ``close`` (and
    leaving ``with``) waits at most ``close_timeout_s`` for acknowledgements,
    as :meth:`EdgeClient.close` does.

    Callbacks added to the returned futures run on the client's loop thread;
    they must not block, nor call :meth:`flush` or :meth:`close`.

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(self, url: str = DEFAULT_URL, **options: Unpack[ClientOptions]) -> None:
        # Built here so bad arguments raise before a thread exists; it binds
        # to the background loop on first use there.
        self._client = EdgeClient(url, **options)
        preparer = self._client._preparer
        self._prepare = preparer.prepare
        self._known_streams = preparer.known_streams
        self._inline_max_bytes = preparer.inline_max_bytes
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        """Notified when the loop thread has taken the intake (see ``_hand_over``)."""
        self._futures_condition = threading.Condition()
        self._intake: deque[_Item] = deque()
        self._wakeup_scheduled = False
        self._final_drained = False
        """Set under the lock by close's last drain; written by the loop thread only."""
        self._closed = False
        self._close_future: concurrent.futures.Future[SendFailed | None] | None = None
        self._send_failed_reported = False
        self._stopped = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, name="edgesync-sdk-loop", daemon=True
        )
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._client.__aenter__(), self._loop).result()

    def __enter__(self) -> SyncEdgeClient:
        if self._closed:
            raise ClosedError("SyncEdgeClient is closed; create a new one")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def stats(self) -> ClientStats:
        """The hosted client's counters (updated by the loop thread)."""
        return self._client.stats

    @property
    def producer_id(self) -> str:
        """The producer id the bridge de-duplicates this client's requests by."""
        return self._client.producer_id

    @property
    def closed(self) -> bool:
        """True once ``close`` or ``abort`` has begun."""
        return self._closed

    def publish(
        self,
        stream: str,
        payload: object,
        *,
        key: str | None = None,
        ts: object = None,
        headers: dict[str, str] | None = None,
    ) -> concurrent.futures.Future[RecordAck]:
        """Queue one record; ``result()`` of the returned future waits until it is durable.

        Callable from any thread. Arguments, errors and the future's outcomes
        are those of :meth:`EdgeClient.publish`; validation errors, ``BufferFull``
        and ``ClosedError`` are raised here, in the calling thread. An
        application that needs no future per record uses :meth:`send`.
        """
        if self._closed:
            raise ClosedError("SyncEdgeClient is closed; it accepts no more records")
        record, nbytes = self._prepare(stream, payload, key, ts, headers)
        future = _RecordFuture(self._futures_condition)
        self._hand_over((stream, record, nbytes, future))
        return future

    def send(
        self,
        stream: str,
        payload: object,
        *,
        key: str | None = None,
        ts: object = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Queue one record fire-and-forget: :meth:`EdgeClient.send`, from any thread.

        No future is made, so this is the fast way to publish from a thread
        (nothing per record but the record itself crosses to the loop thread).
        Validation errors, ``BufferFull`` and ``ClosedError`` are raised here,
        in the calling thread; failures after that are counted in ``stats``,
        logged once per batch, and raised by the next :meth:`flush` or
        :meth:`close` as :class:`SendFailed`.
        """
        if self._closed:
            raise ClosedError("SyncEdgeClient is closed; it accepts no more records")
        # The common record (a known stream, plain_json) without Preparer.prepare's
        # call: the same record and charge it would return.
        if ts is None and headers is None and type(stream) is str and (
                stream in self._known_streams) and (
                data := plain_json(payload, key, self._inline_max_bytes)) is not None:
            self._hand_over((stream, (_now_ns() // 1000, CT_JSON, data, key, None),
                             len(data) + (_OVERHEAD if key is None else _OVERHEAD + len(key)),
                             None))
            return
        record, nbytes = self._prepare(stream, payload, key, ts, headers)
        self._hand_over((stream, record, nbytes, None))

    def _hand_over(self, item: _Item) -> None:
        """Hand a validated record to the loop thread with the others of this burst,
        without a lock: ``deque.append`` and ``popleft`` are atomic, and the loop is
        woken once per burst (one ``call_soon_threadsafe``), taking every record
        handed over since in one go. A thread that has handed over a full chunk
        waits until the loop has taken it.

        Why no record is lost: ``_drain`` clears ``_wakeup_scheduled`` *before* it
        takes the intake, so a record appended after its last ``popleft`` finds
        the flag clear and schedules the next drain. ``close`` sets ``_closed``
        before its final drain (``_final_drained``, after which no drain takes
        anything), so a record appended after that drain finds ``_closed`` set and
        takes itself back (:meth:`_take_back`): its sender gets ``ClosedError``.
        """
        intake = self._intake
        # _outstanding is written by the loop thread and other application threads
        # may append at the same time: the bound can be passed by one record per
        # thread, never run away.
        if self._client._full(len(intake)):
            raise self._client._buffer_full(self._client._outstanding + len(intake))
        intake.append(item)
        if self._closed:
            self._take_back()
        elif not self._wakeup_scheduled:
            self._wakeup_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop has stopped: close's drain took the record
                if not self._closed:
                    raise
        elif len(intake) >= _INTAKE_CHUNK and not self._on_loop_thread():
            # A chunk awaits the loop thread: let it run (see _INTAKE_CHUNK).
            with self._lock:
                self._drained.wait_for(self._intake_taken, _INTAKE_WAIT_S)

    def _take_back(self) -> None:
        """Called when ``close`` began while ``item`` was being handed over: leave it
        if close's final drain has yet to run (it will take it), else raise
        ``ClosedError``. The final drain took every record handed over before it, so
        what the intake holds after it is only records whose senders take them back
        like this one: it is emptied, not searched (iterating a deque that other
        threads append to would raise ``RuntimeError`` in a racing sender)."""
        with self._lock:
            if not self._final_drained:
                return
            self._intake.clear()
        raise ClosedError("SyncEdgeClient is closed; it accepts no more records")

    def _intake_taken(self) -> bool:
        return len(self._intake) < _INTAKE_CHUNK or self._stopped

    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def flush(self, timeout: float | None = None) -> None:
        """Send everything published so far and wait until all of it is settled.

        As :meth:`EdgeClient.flush`: ``publish`` failures are delivered through
        the records' futures; ``send`` failures since the last ``flush`` are
        raised here. After ``close`` there is nothing to flush.

        Raises:
            TimeoutError: not settled within ``timeout`` seconds (sending goes on).
            SendFailed: records sent with ``send`` failed since the last ``flush``.
        """
        self._check_not_loop_thread("flush")
        with self._lock:
            if self._close_future is not None:
                return
            future = asyncio.run_coroutine_threadsafe(self._flush(), self._loop)
        try:
            future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise TimeoutError(f"flush did not complete within {timeout} s") from None

    def close(self, timeout: float | Default | None = Default.TIMEOUT) -> None:
        """Flush for at most ``timeout`` seconds, close the client and stop the loop thread.

        Idempotent and thread-safe; the outcome is that of :meth:`EdgeClient.close`:
        records the bridge has not acknowledged within ``timeout`` (by default
        the client's ``close_timeout_s``; ``None`` waits as long as the retries
        go on) fail with :class:`ClosedError` (code ``not_acknowledged``), and
        ``close`` returns.

        Raises:
            SendFailed: records sent with ``send`` failed since the last
                ``flush``; raised once, to the first caller, after the loop
                thread has stopped.
        """
        self._check_not_loop_thread("close")
        with self._lock:
            self._closed = True
            if self._close_future is None:
                self._close_future = asyncio.run_coroutine_threadsafe(
                    self._aclose(timeout), self._loop)
            close_future = self._close_future
        try:
            failed = close_future.result()
        finally:
            self._stop_loop()
        with self._lock:
            report = failed is not None and not self._send_failed_reported
            self._send_failed_reported |= report
        if report:
            assert failed is not None
            raise failed

    def abort(self) -> None:
        """Close without waiting: fail every unconfirmed record, stop the loop thread.

        As :meth:`EdgeClient.abort`: records not acknowledged yet fail with
        :class:`ClosedError` (those in flight may nevertheless be stored), the
        connections are released, and ``abort`` does not raise for ``send``
        records it fails: the next :meth:`close` raises :class:`SendFailed` for
        them, once. Idempotent and thread-safe; a ``close`` waiting in another
        thread returns at once, its records failed.
        """
        self._check_not_loop_thread("abort")
        with self._lock:
            self._closed = True
            if self._close_future is None:
                self._close_future = asyncio.run_coroutine_threadsafe(
                    self._aclose(None, abort=True), self._loop)
            elif not self._stopped:
                # A close is waiting for acknowledgements: fail them now, which ends
                # its wait. Scheduled under the lock before the loop is told to stop,
                # so it runs (or is cancelled by _run_loop's clean-up) there.
                asyncio.run_coroutine_threadsafe(self._client.abort(), self._loop)
            close_future = self._close_future
        try:
            close_future.result()
        finally:
            self._stop_loop()

    # -- loop thread ------------------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            # Whatever is still scheduled (only after an abnormal stop) is
            # cancelled and run to completion so the loop closes cleanly.
            leftovers = asyncio.all_tasks(self._loop)
            for task in leftovers:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def _drain(self, *, final: bool = False) -> None:
        """Move the records handed over by application threads into the client
        (nothing once close's final drain has run: see ``_hand_over``)."""
        self._wakeup_scheduled = False  # first: see _hand_over
        if self._final_drained:
            return
        intake = self._intake
        popleft = intake.popleft
        with self._lock:
            items = [popleft() for _ in range(len(intake))]
            self._final_drained = final
            self._drained.notify_all()
        self._client._submit(items)

    async def _flush(self) -> None:
        self._drain()
        await self._client.flush()

    async def _aclose(self, timeout: float | Default | None, *,
                      abort: bool = False) -> SendFailed | None:
        # The last drain: a record handed over after it is taken back by its
        # sender, which gets ClosedError (closed is set; see _hand_over).
        self._drain(final=True)
        if abort:
            await self._client.abort()  # then close() below has nothing to wait for
        try:
            await self._client.close(timeout)
        except SendFailed as failed:  # returned: every close() caller shares this future
            return failed
        return None

    def _stop_loop(self) -> None:
        with self._lock:
            first = not self._stopped
            self._stopped = True
        if first:
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def _check_not_loop_thread(self, what: str) -> None:
        if threading.get_ident() == self._thread.ident:
            raise RuntimeError(f"SyncEdgeClient.{what}() from its own loop thread would deadlock")
