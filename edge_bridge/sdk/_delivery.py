"""Delivering sealed batches to the bridge: ``max_in_flight`` senders, retries, back-pressure.

Each sealed batch is POSTed until the bridge confirms it (200), refuses it for
good (4xx), or its ``retry_timeout_s`` runs out. Every retry resends the same
body, so the bridge's ``(producer, request_seq)`` de-duplication stores it at
most once. Outcomes go back to the client (:class:`Settler`), which owns the
records' futures; outages are logged once each by :class:`~edge_bridge.sdk._outage.OutageLog`.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable
from typing import Protocol

from broker.errors import BufferFull, ClosedError, TemporaryError
from broker.protocol.ingress import IngressResponse, records_path
from edge_bridge.sdk._answers import decode_ack, rejection, retry_after_s
from edge_bridge.sdk._batch import OutgoingBatch
from edge_bridge.sdk._defaults import BACKOFF_INITIAL_S, BACKOFF_MAX_S
from edge_bridge.sdk._http import ExchangeError, Poster
from edge_bridge.sdk._log import LOGGER_NAME, EventLogger
from edge_bridge.sdk._outage import OutageLog
from edge_bridge.sdk.results import ClientStats

__all__ = ["Delivery", "Settler"]

_log = EventLogger(LOGGER_NAME)


class Settler(Protocol):
    """Where a batch's outcome goes: the client that holds its records' futures."""

    @property
    def outstanding(self) -> int: ...

    def resolve(self, batch: OutgoingBatch, ack: IngressResponse) -> None: ...

    def fail(self, batch: OutgoingBatch, make_error: Callable[[], BaseException]) -> None: ...


class Delivery:
    """The senders of one client; the pool size is the in-flight limit."""

    def __init__(self, http: Poster, *, producer: str, max_in_flight: int,
                 retry_timeout_s: float, stats: ClientStats, settler: Settler) -> None:
        self.http = http
        self._producer = producer
        self._max_in_flight = max_in_flight
        self._retry_timeout_s = retry_timeout_s
        self._stats = stats
        self._settler = settler
        self._queue: asyncio.Queue[OutgoingBatch] | None = None
        self._senders: list[asyncio.Task[None]] = []
        self.backpressure_hint_s = BACKOFF_INITIAL_S
        """The bridge's last Retry-After: what a refused ``publish`` tells its caller."""
        self.outage = OutageLog(producer=producer, url=http.base_url, stats=stats)

    def send(self, batch: OutgoingBatch, loop: asyncio.AbstractEventLoop) -> None:
        """Queue a sealed batch; the senders start with the first one."""
        if self._queue is None:
            self._queue = asyncio.Queue()
        self._queue.put_nowait(batch)
        if not self._senders:
            self._senders = [
                loop.create_task(self._send_forever(), name=f"edgesync-sdk-sender-{i}")
                for i in range(self._max_in_flight)
            ]

    async def aclose(self) -> None:
        """Stop the senders (a batch they were sending fails) and close the connections."""
        for task in self._senders:
            task.cancel()
        await asyncio.gather(*self._senders, return_exceptions=True)
        self._senders.clear()
        await self.http.aclose()

    async def _send_forever(self) -> None:
        assert self._queue is not None
        while True:
            batch = await self._queue.get()
            try:
                await self._deliver(batch)
            except asyncio.CancelledError:
                self._settler.fail(
                    batch, lambda: ClosedError("client aborted while sending the record"))
                raise
            except Exception as exc:  # a bug here must not leave futures pending forever
                _log.exception("sdk_sender_failed", producer=self._producer, stream=batch.stream)
                self._settler.fail(batch, functools.partial(_same, exc))

    async def _deliver(self, batch: OutgoingBatch) -> None:
        """Send one sealed batch until it is confirmed, rejected, or its deadline passes."""
        loop = asyncio.get_running_loop()
        path = records_path(batch.stream)
        deadline = loop.time() + self._retry_timeout_s
        backoff = BACKOFF_INITIAL_S
        attempt = 0
        while True:
            attempt += 1
            self._stats.requests_sent += 1
            retry_after: float | None = None
            try:
                response = await self.http.post(path, batch.body)
            except ExchangeError as exc:
                # Connection refused/reset, timeouts, a response lost mid-way:
                # the bridge may or may not have stored the batch. Resending
                # the same request id is safe either way.
                problem = str(exc)
            else:
                status = response.status_code
                if status == 200:
                    ack = decode_ack(response.content, batch.count)
                    if ack is not None:
                        self.outage.recovered(now=loop.time())
                        self._settler.resolve(batch, ack)
                        return
                    # Retrying is safe (the bridge answers a repeat with the
                    # original ack) and cures a garbled response.
                    problem = f"malformed 200 answer: {response.content[:200]!r}"
                elif status in (429, 503) and (retry_after := retry_after_s(response)) is not None:
                    problem = f"bridge buffer full (HTTP {status}), retry after {retry_after:g} s"
                    self.backpressure_hint_s = retry_after
                elif 400 <= status < 500 and status != 408:
                    self.outage.recovered(now=loop.time())  # reachable, if not to our liking
                    self._settler.fail(batch, functools.partial(rejection, response))
                    return
                else:
                    problem = f"HTTP {status}: {response.content[:200]!r}"
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._give_up(batch, attempt, problem, retry_after)
                return
            if retry_after is not None:
                # Back-pressure: wait as told, plus a little jitter so blocked
                # producers do not all return in the same millisecond.
                delay = retry_after * random.uniform(1.0, 1.1)
            else:
                delay = random.uniform(backoff / 2, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            delay = min(delay, remaining)
            self._stats.retries += 1
            self.outage.trouble(batch.request_seq, problem, now=loop.time(),
                                pending_records=self._settler.outstanding,
                                retry_timeout_s=self._retry_timeout_s)
            _log.debug(
                "sdk_request_retried",
                **batch.log_fields(self._producer),
                attempt=attempt,
                delay_s=round(delay, 3),
                reason=problem,
            )
            await asyncio.sleep(delay)

    def _give_up(
        self, batch: OutgoingBatch, attempts: int, problem: str, retry_after: float | None
    ) -> None:
        timeout = self._retry_timeout_s
        if retry_after is not None:
            message = f"bridge buffer still full after {timeout:g} s ({attempts} attempts)"
            self._settler.fail(batch, lambda: BufferFull(message, retry_after=retry_after))
        else:
            message = (
                f"bridge unreachable for {timeout:g} s ({attempts} attempts; last: {problem}); "
                "the records may or may not be stored"
            )
            self._settler.fail(batch, lambda: TemporaryError(message, delay=BACKOFF_MAX_S))


def _same(exc: BaseException) -> BaseException:
    return exc
