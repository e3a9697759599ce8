"""Pull requests on the records consumer, their deliveries gathered by a callback.

nats-py's ``PullSubscription.fetch`` takes each delivered message with
``next_msg``: a task, a uuid, an ``asyncio.wait_for`` timer and four or five turns
of the event loop per message. A fleet's group is a thousand 10-record batches,
so that was paid a thousand times per transaction (measured: ~58 µs of ingest CPU
per message fetched). A :class:`Puller` sends the same pull requests JetStream
defines (``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>``, reply to an inbox of
its own) and a callback subscription on ``<inbox>.*`` appends each delivery to
the request in flight, in nats-py's receive loop: no task or timer per message.

A delivery carries the stream's subject, not the request's, so one puller serves
one fetch at a time (each ingest worker has its own). JetStream's statuses (``404``
nothing more ready, ``408`` request expired) come on the request's own reply
subject, so a late status of an earlier request is told apart and ignored. A fetch
first asks with ``no_wait`` (JetStream sends what is ready, then a ``404`` if that
was fewer than asked); only when nothing was ready does it send one lingering
request that expires as the fetch gives up (as nats-py's ``fetch`` does). A message
delivered when no fetch waits (it came as the last one gave up) is not lost: it is
kept, and the next fetch takes it first, before asking JetStream; an idle worker's
long poll does too, so it never waits beside a message in hand. A ``409`` (refused
for now, e.g. too many requests waiting) makes the fetch wait out its timeout empty,
not return at once (an idle worker would ask again in a tight loop); any other
status (``503``: the consumer is gone) raises :class:`PullFailed`.

Messages are nats-py ``Msg`` objects bound to the client as ever (ack,
``in_progress``); only the way they are collected changes. On a
:class:`~cloud_ingest.direct_delivery.DeliveringClient` (the ingest's) the inbox's
deliveries skip nats-py's per-message path: they are handed over as they are read
and become :class:`~cloud_ingest.direct_delivery.Delivery` messages (headers parsed
when first read), statuses are read from the raw header line; whatever that path
does not take (an unusual header block) reaches the same handling through the
subscription's callback, as on any other client.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cloud_ingest.direct_delivery import (
    DATA_HEADER_LINE,
    DeliveringClient,
    Delivery,
    status_of,
    unsubscribe,
)

__all__ = ["PullFailed", "Puller"]

_NO_MESSAGES = "404"
_REQUEST_TIMEOUT = "408"
_CONFLICT = "409"
_HEARTBEAT = "100"
_EXPIRES_MARGIN_NS = 100_000
"""A lingering request expires this much before its fetch gives up (as nats-py's does),
so JetStream rarely delivers to a request nobody waits for any more."""


class PullFailed(Exception):
    """JetStream answered a pull request with an error status (not 404/408/409)."""


class _Request:
    """One pull request in flight: what it asked for, what came, whether it ended."""

    __slots__ = ("done", "msgs", "status", "token", "want")

    def __init__(self, token: str, want: int) -> None:
        self.token = token
        self.want = want
        self.msgs: list[Msg] = []
        self.status: str | None = None
        self.done = asyncio.Event()


class Puller:
    """Fetches from one durable pull consumer (module docstring)."""

    def __init__(self, nc: NATS, stream: str, consumer: str) -> None:
        self._nc = nc
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._sub: Subscription | None = None
        self._prefix = ""
        self._tokens = itertools.count()
        self._open: _Request | None = None
        """The request a fetch waits on, if any."""
        self._kept: list[Msg] = []
        """Messages delivered when no fetch waited: the next fetch's first."""

    async def start(self) -> None:
        inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{inbox}.*", cb=self._delivered)
        self._prefix = f"{inbox}."
        if isinstance(self._nc, DeliveringClient):
            self._nc.deliver_directly(self._sub, self._take)

    async def close(self) -> None:
        if self._sub is not None:
            await unsubscribe(self._nc, self._sub)
            self._sub = None

    @property
    def kept(self) -> int:
        """Messages held for the next fetch."""
        return len(self._kept)

    async def fetch(self, batch: int, *, timeout: float,
                    interrupt: asyncio.Event | None = None) -> list[Msg]:
        """Up to ``batch`` messages: those ready at once, else whatever arrives within
        ``timeout`` seconds (``[]`` if none; ``interrupt`` set ends the wait at once).

        Raises:
            PullFailed: JetStream refused the request (e.g. the consumer is gone).
            Whatever publishing the request raises (the connection is closed, ...).
        """
        if self._kept:
            got, self._kept = self._kept[:batch], self._kept[batch:]
            return got
        started = time.monotonic()
        req = await self._request(batch, {"batch": batch, "no_wait": True})
        await self._wait(req, timeout, interrupt)
        if req.msgs or req.status not in (_NO_MESSAGES, _REQUEST_TIMEOUT, _CONFLICT, None):
            return self._result(req)
        if interrupt is not None and interrupt.is_set():
            return []
        remaining = timeout - (time.monotonic() - started)
        expires = int(remaining * 1e9) - _EXPIRES_MARGIN_NS
        if req.status != _CONFLICT and expires > 0:
            req = await self._request(batch, {"batch": batch, "expires": expires})
            await self._wait(req, remaining, interrupt)
        if req.status == _CONFLICT and not req.msgs:
            # Refused for now (e.g. too many requests waiting): nothing this time, and
            # not at once either, or an idle worker would ask again in a tight loop.
            await self._wait(_Request("", 1), timeout - (time.monotonic() - started),
                             interrupt)
        return self._result(req)

    async def _request(self, batch: int, body: dict[str, object]) -> _Request:
        if self._open is not None:
            raise RuntimeError("a Puller serves one fetch at a time")
        if self._sub is None:
            await self.start()
        req = self._open = _Request(f"{self._prefix}{next(self._tokens)}", batch)
        try:
            await self._nc.publish(self._next_subject, json.dumps(body).encode(),
                                   reply=req.token)
        except BaseException:
            self._open = None
            raise
        return req

    async def _wait(self, req: _Request, timeout: float, interrupt: asyncio.Event | None
                    ) -> None:
        """Until ``req`` ends, ``timeout`` passes or ``interrupt`` is set; then close it
        (later deliveries are kept for the next fetch)."""
        try:
            if req.done.is_set():
                return
            waits = [asyncio.ensure_future(req.done.wait())]
            if interrupt is not None:
                waits.append(asyncio.ensure_future(interrupt.wait()))
            try:
                await asyncio.wait(waits, timeout=max(0.0, timeout),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        finally:
            self._open = None

    @staticmethod
    def _result(req: _Request) -> list[Msg]:
        if not req.msgs and req.status not in (_NO_MESSAGES, _REQUEST_TIMEOUT, _CONFLICT, None):
            raise PullFailed(f"pull request refused: status {req.status}")
        return req.msgs

    def _take(self, sid: int, subject: bytes, reply: bytes, data: bytes,
              headers: bytes | None) -> bool:
        """The direct path's sink (:mod:`cloud_ingest.direct_delivery`): a delivery or a
        status, as :meth:`_delivered` would see it; False leaves an unusual header
        block to nats-py's path (and :meth:`_delivered`)."""
        # An edge may publish on any subject token below its own (es.rec.<edge>.*), which
        # nats-server passes on whatever its bytes: a subject that is not UTF-8 is read
        # with its odd bytes escaped (``\xff``), so its message is dead-lettered with a
        # reason, where a strict decode would raise in the read loop and stop it.
        if headers is None or headers.startswith(DATA_HEADER_LINE):
            self._message(Delivery(self._nc, sid, subject.decode("utf-8", "backslashreplace"),
                                   reply.decode("utf-8", "backslashreplace"), data, headers))
            return True
        status = status_of(headers)
        if status is None:
            return False
        self._status(subject.decode("utf-8", "backslashreplace"), status)
        return True

    async def _delivered(self, msg: Msg) -> None:
        """The subscription's callback: a delivery (for the request in flight, else
        kept) or a status (ends the request whose reply subject it came on)."""
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if status is None:
            self._message(msg)
        else:
            self._status(msg.subject, status)

    def _message(self, msg: Msg) -> None:
        req = self._open
        if req is None or req.done.is_set():
            self._kept.append(msg)
            return
        req.msgs.append(msg)
        if len(req.msgs) >= req.want:
            req.done.set()

    def _status(self, subject: str, status: str) -> None:
        req = self._open
        if status == _HEARTBEAT or req is None or subject != req.token:
            return  # a heartbeat, or a late status of a request given up on
        req.status = status
        req.done.set()
