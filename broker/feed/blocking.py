"""The consumer SDK for synchronous code: :class:`SyncSubscription`.

It drives an :class:`~broker.feed.subscribing.Subscription` on a private event loop
in the calling thread; the loop runs only inside its calls, so handling a batch
must take less than ``lease_ttl_s`` (the lease is renewed when the next batch is
asked for and at each commit).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from typing import Any

from broker.feed.reading import StartAt, StreamKey
from broker.feed.subscribing import FeedBatch, Subscription

__all__ = ["SyncSubscription"]


class SyncSubscription:
    """The blocking twin of :class:`Subscription` (same arguments)::

        with SyncSubscription(dsn, "nightly", streams=["telemetry"]) as sub:
            for batch in sub:
                write_somewhere(batch.records)
                sub.commit()
    """

    def __init__(self, dsn: str, name: str, **options: Any) -> None:
        self._sub = Subscription(dsn, name, **options)
        self._loop = asyncio.new_event_loop()

    def __enter__(self) -> SyncSubscription:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        self._loop.run_until_complete(self._sub.open())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._loop.run_until_complete(self._sub.close())
        finally:
            self._loop.close()

    def __iter__(self) -> Iterator[FeedBatch]:
        return self

    def __next__(self) -> FeedBatch:
        try:
            return self._loop.run_until_complete(self._sub.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def commit(self) -> None:
        """Store the checkpoint (see :meth:`Subscription.commit`)."""
        self._loop.run_until_complete(self._sub.commit())

    def seek(self, start_at: StartAt) -> None:
        self._loop.run_until_complete(self._sub.seek(start_at))

    @property
    def cursor(self) -> str:
        return self._sub.cursor

    @property
    def name(self) -> str:
        return self._sub.name

    def completeness(self) -> Mapping[StreamKey, int]:
        return self._sub.completeness()
