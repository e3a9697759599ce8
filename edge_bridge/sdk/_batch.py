"""A batch on its way from ``publish`` to the bridge, and what waits on its records.

An :class:`OutgoingBatch` is *pending* (open to more records of its stream) until it is
sealed; sealed, it has its request sequence and its encoded body, which every
retry resends unchanged; it is *settled* once each record's waiter has its
result or its error, exactly once.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from broker.protocol.wire import Record
from edge_bridge.sdk.results import RecordAck

__all__ = ["OutgoingBatch", "Waiter"]


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
        self.records: list[Record] = []
        self.waiters: list[Waiter] = []
        self.nbytes = 0
        self.timer: asyncio.Handle | None = None
        self.request_seq = -1
        self.body = b""
        self.done: asyncio.Future[None] | None = None
        self.settled = False
