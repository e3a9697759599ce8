"""A batch on its way from ``publish`` to the bridge, and what waits on its records.

An :class:`OutgoingBatch` is *pending* (open to more records of its stream) until it is
sealed; sealed, it has its request sequence and its encoded body, which every
retry resends unchanged; it is *settled* once each record's waiter has its
result or its error, exactly once (:func:`resolve_waiters`, :func:`fail_waiters`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Final, Protocol

from edge_bridge.sdk._records import OutRecord
from edge_bridge.sdk.results import RecordAck

__all__ = ["OutgoingBatch", "Waiter", "fail_waiters", "resolve_waiters"]

_INVALID_STATE: Final = (asyncio.InvalidStateError, concurrent.futures.InvalidStateError)


class Waiter(Protocol):
    """What a record's completion needs: both asyncio and concurrent futures fit."""

    def set_result(self, result: RecordAck, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...

    def exception(self) -> BaseException | None: ...


class OutgoingBatch:
    """One stream's records on their way: pending (open), then sealed until settled."""

    __slots__ = (
        "body",
        "done",
        "nbytes",
        "records",
        "request_seq",
        "settled",
        "stream",
        "timer",
        "waiters",
    )

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.records: list[OutRecord] = []
        self.waiters: list[Waiter] = []
        self.nbytes = 0
        self.timer: asyncio.Handle | None = None
        self.request_seq = -1
        self.body = b""
        self.done: asyncio.Future[None] | None = None
        self.settled = False


def resolve_waiters(waiters: list[Waiter], stream: str, epoch: int, first_seq: int) -> None:
    """Give record ``i`` its identity ``(stream, epoch, first_seq + i)``.

    Waiters of a type with a ``resolve_all`` (the synchronous client's futures) are
    resolved by it, all at once; a batch holds waiters of one client, of one type.
    """
    resolve_all = getattr(type(waiters[0]), "resolve_all", None) if waiters else None
    if resolve_all is not None:
        resolve_all(waiters, stream, epoch, first_seq)
        return
    for i, waiter in enumerate(waiters):
        # No done() check first: on a concurrent future it takes a lock, and a
        # future is cancelled rarely; set_result refuses those.
        try:
            waiter.set_result(RecordAck(stream, epoch, first_seq + i))
        except _INVALID_STATE:
            continue


def fail_waiters(waiters: list[Waiter], make_error: Callable[[], BaseException]) -> None:
    """Fail every record, each with its own exception instance.

    Separate instances, because an exception raised in many places (and
    threads) at once would grow one shared traceback.
    """
    for waiter in waiters:
        try:
            waiter.set_exception(make_error())
        except _INVALID_STATE:  # cancelled by the application
            continue
        # Mark it retrieved: a fire-and-forget publisher gets the one log line
        # the client writes per batch, not one "exception never retrieved" per record.
        waiter.exception()
