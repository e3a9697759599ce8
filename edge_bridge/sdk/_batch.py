"""A batch on its way from ``publish``/``send`` to the bridge, and what waits on its records.

An :class:`OutgoingBatch` is *pending* (open to more records of its stream) until it is
sealed; sealed, it has its request sequence and its encoded body, which every
retry resends unchanged; it is *settled* once each record's waiter has its
result or its error, exactly once (:func:`resolve_waiters`, :func:`fail_waiters`).

Records published with a future (``publish``) have a *waiter*; records sent
fire-and-forget (``send``) have none and cost the batch nothing but a count
(:attr:`OutgoingBatch.unwaited`), so settling a batch of them is O(1). A batch
may mix both, in order: :attr:`OutgoingBatch.gaps` remembers where waiters
follow unwaited records, so each waiter still gets its own record's seq.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Iterable, Iterator
from typing import Final, Protocol

from edge_bridge.sdk._records import OutRecord
from edge_bridge.sdk.results import RecordAck

__all__ = ["OutgoingBatch", "Waiter", "fail_waiters", "resolve_waiters", "waiter_seqs"]

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
        "gaps",
        "nbytes",
        "records",
        "request_seq",
        "settled",
        "stream",
        "timer",
        "unwaited",
        "waiters",
    )

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.records: list[OutRecord] = []
        self.waiters: list[Waiter] = []
        self.unwaited = 0
        """Records without a waiter (``send``): counted, not held."""
        self.gaps: list[tuple[int, int]] | None = None
        """``(waiter index, unwaited records before it)`` wherever that count changes;
        None while no waiter follows an unwaited record (the common case)."""
        self.nbytes = 0
        self.timer: asyncio.Handle | None = None
        self.request_seq = -1
        self.body = b""
        self.done: asyncio.Future[None] | None = None
        self.settled = False

    @property
    def count(self) -> int:
        """Records in the batch, with a waiter or without."""
        return len(self.waiters) + self.unwaited

    def log_fields(self, producer: str) -> dict[str, object]:
        """What a log line about this batch names: whose, which stream and request, how big."""
        return {"producer": producer, "stream": self.stream, "request_seq": self.request_seq,
                "records": self.count}

    def mark_gap(self) -> None:
        """The next waiter follows :attr:`unwaited` records without one: note it if new."""
        gaps = self.gaps
        if gaps is None:
            self.gaps = [(len(self.waiters), self.unwaited)]
        elif gaps[-1][1] != self.unwaited:
            gaps.append((len(self.waiters), self.unwaited))



def waiter_seqs(waiters: int, first_seq: int, gaps: list[tuple[int, int]] | None) -> Iterable[int]:
    """The seq of each of ``waiters`` records with a waiter, in order, given the batch's
    first seq and its :attr:`OutgoingBatch.gaps`."""
    if gaps is None:
        return range(first_seq, first_seq + waiters)
    return _gapped_seqs(waiters, first_seq, gaps)


def _gapped_seqs(waiters: int, first_seq: int, gaps: list[tuple[int, int]]) -> Iterator[int]:
    start, skipped = 0, 0
    for end, next_skipped in [*gaps, (waiters, 0)]:
        yield from range(first_seq + skipped + start, first_seq + skipped + end)
        start, skipped = end, next_skipped


def resolve_waiters(waiters: list[Waiter], stream: str, epoch: int, first_seq: int,
                    gaps: list[tuple[int, int]] | None = None) -> None:
    """Give each waiter its record's identity ``(stream, epoch, seq)``: waiter ``i``
    gets ``first_seq + i`` plus the records without a waiter before it (``gaps``).

    Waiters of a type with a ``resolve_all`` (the synchronous client's futures) are
    resolved by it, all at once; a batch holds waiters of one client, of one type.
    """
    if not waiters:
        return
    resolve_all = getattr(type(waiters[0]), "resolve_all", None)
    if resolve_all is not None:
        resolve_all(waiters, stream, epoch, first_seq, gaps)
        return
    for waiter, seq in zip(waiters, waiter_seqs(len(waiters), first_seq, gaps), strict=True):
        # No done() check first: on a concurrent future it takes a lock, and a
        # future is cancelled rarely; set_result refuses those.
        try:
            waiter.set_result(RecordAck(stream, epoch, seq))
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
