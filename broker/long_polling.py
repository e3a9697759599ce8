"""One long pull request that something else may end early.

An idle consumer that renewed a short pull request many times a second costs
JetStream (and itself) a request and an expiry each time; one long request costs
one. :func:`fetch_one_unless` waits for one message with one request and gives up
at once when an event is set (shutdown, a reconnect that lost the request). A
message JetStream delivers to an abandoned request is not lost: it waits in the
subscription's queue, where the next fetch of the same subscription takes it first,
or, if the subscription is closed, it is redelivered after the consumer's
``ack_wait``, as after a crash.
"""

from __future__ import annotations

import asyncio

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import FetchTimeoutError

from broker.interrupting import Interrupted, unless

__all__ = ["fetch_one_unless"]


async def fetch_one_unless(sub: JetStreamContext.PullSubscription, *, timeout: float,
                           interrupt: asyncio.Event) -> list[Msg]:
    """One message, or ``[]`` when ``timeout`` passes empty or ``interrupt`` is set.

    Raises:
        Whatever else the fetch raises (a lost connection, ...).
    """
    try:
        return await unless(sub.fetch(1, timeout=timeout), interrupt)
    except (Interrupted, FetchTimeoutError, nats.errors.TimeoutError, TimeoutError):
        return []  # nats-py raises a bare TimeoutError when the request expired empty
