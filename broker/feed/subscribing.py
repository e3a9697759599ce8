"""Named durable subscriptions over the commit-ordered feed (the consumer SDK).

::

    async with Subscription(dsn, "billing", streams=["telemetry"]) as sub:
        async for batch in sub:
            for record in batch:
                handle(record)
            await sub.commit()          # checkpoint: a restart resumes after this batch

Delivery is at-least-once: a crash after handling a batch but before
``commit()`` gets the batch again (records carry their identity to de-duplicate).
A consumer writing into the same PostgreSQL gets exactly-once with
:meth:`Subscription.exactly_once`: its writes and the checkpoint commit together.

One process at a time consumes a name: opening takes a *lease* on the
subscription's row (``feed_subscriptions``), renewed as the consumer reads and
commits. A second process of the same name waits as a standby and takes over
when the lease expires (the holder crashed) or is released. Every lease bumps a
generation, and a checkpoint only lands under the generation that read the
data, so a holder that stalled past its lease cannot overwrite its successor's
progress (it gets :class:`~broker.errors.Conflict` ``lease_lost``). To spread
load over processes, give each its own subscription name with disjoint
``edges``/``streams`` filters: a partition each, each ordered and exactly-once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from broker.errors import ClosedError, Conflict, InvalidInput
from broker.feed.positions import EARLIEST, FEED_CHANNEL, encode_cursor
from broker.feed.reading import (
    PAGE_MAX_BYTES,
    Connection,
    FeedRecord,
    Filters,
    StartAt,
    StreamKey,
    completeness_at,
    read_page,
    resolve_start,
)
from broker.opening import Opened

__all__ = ["FeedBatch", "Subscription"]


@dataclass(frozen=True, slots=True)
class FeedBatch:
    """Records delivered together, and the feed's state after them."""

    records: list[FeedRecord]
    cursor: str
    """The cursor after this batch: what :meth:`Subscription.commit` stores."""
    watermarks: dict[StreamKey, int]
    """Completeness this batch advanced (``(edge, stream, epoch)`` -> watermark)."""

    def __iter__(self) -> Iterator[FeedRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


class Subscription(Opened):
    """A named, durable, filtered reader of the feed (module docstring).

    Args:
        dsn: the edgesync PostgreSQL.
        name: the subscription; its checkpoint and lease are stored under it.
        edges, streams: only records of these (empty: all).
        since, until: only records whose event time is in ``[since, until)``.
        start_at: where a *new* name starts: ``"earliest"`` (default), ``"latest"``,
            a cursor, or a time. A name with a checkpoint resumes from it; use
            :meth:`seek` to move it.
        batch_size: records per batch at most.
        batch_max_bytes: bytes of records (payload, headers and key as stored) per batch
            at most; a single larger record comes in a batch of its own.
        lease_ttl_s: seconds the lease lasts without a read or commit; handling one
            batch must take less.
        wait_for_lease: wait as a standby while another process holds the name
            (else raise ``Conflict("subscription_busy")``).
        stop_when_caught_up: end the iteration at the end of the feed instead of
            waiting for new commits (batch jobs, exports).
        poll_s: longest wait for a commit notification before looking anyway.
    """

    def __init__(
        self,
        dsn: str,
        name: str,
        *,
        edges: Iterable[str] | None = None,
        streams: Iterable[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        start_at: StartAt = "earliest",
        batch_size: int = 1000,
        batch_max_bytes: int = PAGE_MAX_BYTES,
        lease_ttl_s: float = 30.0,
        wait_for_lease: bool = True,
        stop_when_caught_up: bool = False,
        poll_s: float = 5.0,
    ) -> None:
        if not name or len(name) > 200:
            raise InvalidInput("a subscription name is 1 to 200 characters",
                               code="invalid_subscription")
        if batch_size < 1 or batch_max_bytes < 1 or lease_ttl_s <= 0:
            raise InvalidInput("batch_size, batch_max_bytes and lease_ttl_s must be positive")
        self.name = name
        self.filters = Filters.of(edges=edges, streams=streams, since=since, until=until)
        self._dsn = dsn
        self._start_at = start_at
        self._batch_size = batch_size
        self._batch_max_bytes = batch_max_bytes
        self._ttl = lease_ttl_s
        self._wait_for_lease = wait_for_lease
        self._stop_when_caught_up = stop_when_caught_up
        self._poll = poll_s
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._conn: asyncpg.Connection | None = None
        self._generation = 0
        self._read = EARLIEST  # cursor after what was read (handed out)
        self._delivered = EARLIEST  # cursor after the last batch handed out
        self._committed = EARLIEST
        self._completeness: dict[StreamKey, int] = {}
        self._woken = asyncio.Event()
        self._waiting = False
        self._renewed = 0.0
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, take the lease (waiting as a standby if asked), find the cursor.

        Raises:
            Conflict: another process holds the name and ``wait_for_lease`` is off.
            ClosedError: the subscription was closed before.
        """
        if self._closed or self._conn is not None:
            raise ClosedError(f"subscription {self.name!r} cannot be opened twice")
        self._conn = conn = await asyncpg.connect(self._dsn)
        try:
            start = await resolve_start(conn, self._start_at)
            await conn.execute(
                "INSERT INTO feed_subscriptions (name, position, filters) VALUES ($1, $2, $3)"
                " ON CONFLICT (name) DO NOTHING",
                self.name, start, json.dumps(self.filters.to_json()))
            position = await self._take_lease(conn)
            self._read = self._delivered = self._committed = position
            self._completeness = (
                {} if position == EARLIEST
                else await completeness_at(conn, position, self.filters))
            await conn.add_listener(FEED_CHANNEL, self._notified)
        except BaseException:
            await self._disconnect()
            raise

    async def close(self) -> None:
        """Release the lease (a standby takes over at once) and disconnect."""
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):  # the lease expires by itself anyway
                await asyncio.shield(conn.execute(
                    "UPDATE feed_subscriptions SET holder = NULL, lease_until = NULL"
                    " WHERE name = $1 AND generation = $2", self.name, self._generation))
        await self._disconnect()

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(conn.close()), timeout=5.0)
        except BaseException:
            conn.terminate()
            raise

    def _db(self) -> asyncpg.Connection:
        if self._conn is None or self._closed:
            raise ClosedError(f"subscription {self.name!r} is not open")
        return self._conn

    def _notified(self, *_: Any) -> None:
        self._woken.set()

    # -- the lease -------------------------------------------------------------------

    async def _take_lease(self, conn: asyncpg.Connection) -> int:
        while True:
            row = await conn.fetchrow(
                "UPDATE feed_subscriptions SET holder = $2, generation = generation + 1,"
                " lease_until = now() + make_interval(secs => $3), filters = $4,"
                " updated_at = now()"
                " WHERE name = $1 AND (holder IS NULL OR lease_until < now())"
                " RETURNING generation, position",
                self.name, self.holder, self._ttl, json.dumps(self.filters.to_json()))
            if row is not None:
                self._generation = row["generation"]
                self._renewed = asyncio.get_running_loop().time()
                return int(row["position"])
            if not self._wait_for_lease:
                raise Conflict(f"subscription {self.name!r} is held by another process",
                               code="subscription_busy")
            await asyncio.sleep(min(self._ttl / 3, 1.0))

    async def _renew(self) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._renewed < self._ttl / 3:
            return
        status = await self._db().execute(
            "UPDATE feed_subscriptions SET lease_until = now() + make_interval(secs => $3)"
            " WHERE name = $1 AND generation = $2", self.name, self._generation, self._ttl)
        if status.endswith(" 0"):
            raise self._lost()
        self._renewed = now

    def _lost(self) -> Conflict:
        return Conflict(f"subscription {self.name!r}: the lease passed to another process "
                        "(this one stalled past lease_ttl_s); reopen to continue from its "
                        "checkpoint", code="lease_lost")

    # -- reading ---------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[FeedBatch]:
        return self

    async def __anext__(self) -> FeedBatch:
        conn = self._db()
        while True:
            await self._renew()
            self._woken.clear()  # a commit notified while reading wakes the next wait
            page = await read_page(conn, self._read, self.filters, limit=self._batch_size,
                                   max_bytes=self._batch_max_bytes)
            self._read = page.cursor
            self._completeness.update(page.watermarks)
            if page.records or page.watermarks:
                self._delivered = page.cursor
                return FeedBatch(page.records, encode_cursor(page.cursor), page.watermarks)
            if not page.caught_up:
                continue
            self._delivered = page.cursor  # only commits the filters skip: nothing to do
            if self._stop_when_caught_up:
                raise StopAsyncIteration
            self._waiting = True
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), timeout=self._poll)
            finally:
                self._waiting = False

    # -- checkpoints -----------------------------------------------------------------

    @property
    def waiting(self) -> bool:
        """True while caught up and waiting for a commit (woken by NOTIFY, or after
        ``poll_s``)."""
        return self._waiting

    @property
    def cursor(self) -> str:
        """The cursor after the last batch handed out."""
        return encode_cursor(self._delivered)

    @property
    def committed_cursor(self) -> str:
        """The stored checkpoint (where a restart resumes)."""
        return encode_cursor(self._committed)

    def completeness(self) -> Mapping[StreamKey, int]:
        """Per ``(edge, stream, epoch)`` the filters pass, the seq up to which every
        record is committed (and delivered, at or before the last batch handed out),
        dropped on purpose by the edge, or dead-lettered: a window of a stream is
        complete once its last seq is at or below this."""
        return dict(self._completeness)

    async def commit(self) -> None:
        """Store the checkpoint: every batch handed out so far is done.

        Raises:
            Conflict: ``lease_lost``, another process holds the name now.
        """
        await self._checkpoint(self._db(), self._delivered)
        self._committed = self._delivered

    @contextlib.asynccontextmanager
    async def exactly_once(self, conn: Connection) -> AsyncIterator[None]:
        """A transaction on the consumer's own ``conn`` (same PostgreSQL database) that
        also stores the checkpoint: the consumer's writes and the cursor commit
        together or not at all, so each record takes effect exactly once::

            async for batch in sub:
                async with sub.exactly_once(conn):
                    await conn.executemany("INSERT INTO totals ...", rows_of(batch))

        Raises:
            Conflict: ``lease_lost`` (the transaction is rolled back).
        """
        cursor = self._delivered
        async with conn.transaction():
            yield
            await self._checkpoint(conn, cursor)
        self._committed = cursor

    async def _checkpoint(self, conn: Connection, cursor: int) -> None:
        status = await conn.execute(
            "UPDATE feed_subscriptions SET position = $3, updated_at = now(),"
            " lease_until = now() + make_interval(secs => $4)"
            " WHERE name = $1 AND generation = $2",
            self.name, self._generation, cursor, self._ttl)
        if status.endswith(" 0"):
            raise self._lost()
        self._renewed = asyncio.get_running_loop().time()

    async def seek(self, start_at: StartAt) -> None:
        """Move the reader (and the checkpoint) to ``start_at``; see :data:`StartAt`."""
        conn = self._db()
        cursor = await resolve_start(conn, start_at)
        await self._checkpoint(conn, cursor)
        self._read = self._delivered = self._committed = cursor
        self._completeness = ({} if cursor == EARLIEST
                              else await completeness_at(conn, cursor, self.filters))
