"""The records consumer's deliveries (and the watermark puts' acks) handed straight
from nats-py's read loop.

For every message it reads, nats-py's ``Client._process_msg`` parses the header
block into a dict, builds a ``Msg``, does JetStream bookkeeping, puts the message
on the subscription's asyncio queue, and the subscription's task takes it off and
awaits the callback: ~30 µs of ingest CPU per message measured, per 10-record
batch in a fleet's fan-in, more than the batch's records cost to decode.

A :class:`DeliveringClient` is the nats-py client with one change: a subscription
registered with :meth:`~DeliveringClient.deliver_directly` has its messages handed
to a plain function as they are read (``sid, subject, reply, payload, raw header
bytes``): no header dict, no ``Msg``, no queue, no task switch. The function
returns False for a message it does not take, which then goes through nats-py's
own path unchanged (to the subscription's callback). Everything else (every other
subscription, requests, JetStream's own inboxes, the connection: TLS,
authentication, pings, reconnects) is nats-py's, untouched. A reconnect keeps
subscriptions and their sids (nats-py re-sends their ``SUB`` commands), so a
registration survives it; a delivery whose sid is no longer the registered
subscription (unsubscribed) falls back to nats-py, which drops it as ever.

:class:`Delivery` is what the ingest then holds: a ``Msg`` (ack, ``in_progress``,
``metadata`` from the reply subject, all nats-py's own) whose ``headers`` are
parsed from the raw block only when first read, as nats-py's
``_parse_header_lines`` parses them.

nats-py private names used here (pinned by tests/integration/test_direct_delivery.py,
which fails if they change): ``Client._process_msg(sid, subject, reply, data,
headers)`` as the protocol parser calls it, ``Client._subs`` (sid -> subscription),
``Client.stats``, and ``Subscription._id``, ``_received``, ``_max_msgs``, ``_jsi``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = [
    "DATA_HEADER_LINE",
    "DeliveringClient",
    "Delivery",
    "Sink",
    "parse_header_block",
    "status_of",
]

Sink = Callable[[int, bytes, bytes, bytes, "bytes | None"], bool]
"""Takes ``(sid, subject, reply, payload, raw headers or None)``; False: not taken."""

DATA_HEADER_LINE = b"NATS/1.0\r\n"
"""How a header block without an inline status begins (JetStream's data deliveries)."""
_STATUS_LINE = b"NATS/1.0 "
_WHITESPACE = re.compile(r"\s")


class DeliveringClient(NATS):
    """nats-py's client, with direct delivery for registered subscriptions (module
    docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, tuple[Subscription, Sink]] = {}
        self.direct_deliveries = 0
        """Messages a sink took (a fallback to nats-py's path does not count)."""

    def deliver_directly(self, sub: Subscription, sink: Sink) -> None:
        """Hand ``sub``'s messages to ``sink`` as they are read (until
        :meth:`stop_delivering`; ``sub``'s callback gets what ``sink`` does not take).

        Raises:
            ValueError: ``sub`` is not a plain subscription of this client (an
                auto-unsubscribe limit or JetStream state of its own would need
                nats-py's bookkeeping per message).
        """
        if self._subs.get(sub._id) is not sub or sub._max_msgs or sub._jsi is not None:
            raise ValueError("only a plain subscription of this client is delivered directly")
        self._direct[sub._id] = (sub, sink)

    def stop_delivering(self, sub: Subscription) -> None:
        """Give ``sub``'s messages back to nats-py's path."""
        self._direct.pop(sub._id, None)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes | None) -> None:
        route = self._direct.get(sid)
        if route is not None:
            sub, sink = route
            if self._subs.get(sid) is sub and sink(sid, subject, reply, data, headers):
                # The bookkeeping nats-py's path does for such a subscription.
                self.stats["in_msgs"] += 1
                self.stats["in_bytes"] += len(data)
                sub._received += 1
                self.direct_deliveries += 1
                return
        # nats-py's parser passes None for no headers (its annotation says bytes).
        await super()._process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]


def status_of(headers: bytes | None) -> str | None:
    """The inline status (``"404"``, ``"408"``, ``"100"``...) of a raw header block,
    as nats-py reads it into ``headers["Status"]``; None if it has none."""
    if headers is None or not headers.startswith(_STATUS_LINE):
        return None
    status = headers[9:12].strip()
    return status.decode() if status.isdigit() else None


def parse_header_block(headers: bytes) -> dict[str, str] | None:
    """The headers of a block that starts with :data:`DATA_HEADER_LINE`, as nats-py
    parses them (``_parse_header_lines``: ``Name: Value`` lines, names without
    whitespace, values stripped, the last of a repeated name wins); None if empty."""
    out: dict[str, str] = {}
    for line in headers[len(DATA_HEADER_LINE):].split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if _WHITESPACE.search(key):
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out or None


class Delivery(Msg):
    """A JetStream delivery taken directly: nats-py's ``Msg`` (acks, metadata) whose
    headers are parsed from their raw block when first read."""

    def __init__(  # noqa: PLR0917  # one call per delivered message: positional is cheaper
            self, client: NATS, sid: int, subject: str, reply: str, data: bytes,
            raw_headers: bytes | None) -> None:
        # Msg's fields, set as its dataclass __init__ would (without its keyword
        # handling: one of these per delivered message).
        self._client = client
        self._sid = sid
        self.subject = subject
        self.reply = reply
        self.data = data
        self._metadata = None
        self._ackd = False
        self._raw_headers = raw_headers
        self._headers: dict[str, str] | None = None
        self._parsed = raw_headers is None

    @property  # Msg.headers is a field; here it is parsed when first read
    def headers(self) -> dict[str, str] | None:
        if not self._parsed:
            raw = self._raw_headers
            assert raw is not None
            self._headers = parse_header_block(raw)
            self._parsed = True
        return self._headers

    @headers.setter
    def headers(self, value: dict[str, str] | None) -> None:
        self._headers = value
        self._parsed = True
