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

The client's protocol parser (:class:`_FrameParser`) splits whole ``MSG``/``HMSG``
frames by hand and hands a registered subscription's messages to its sink without
a coroutine each; every other operation, and any frame it does not accept, is
nats-py's parser's, unchanged.

nats-py private names used here (pinned by tests/integration/test_direct_delivery.py,
which fails if they change): ``Client._process_msg(sid, subject, reply, data,
headers)`` as the protocol parser calls it, ``Client._subs`` (sid -> subscription),
``Client.stats``, ``Client._ps`` (made once in ``__init__``, reset on a reconnect),
``Parser.buf`` and ``Parser.state``, and ``Subscription._id``, ``_received``,
``_max_msgs``, ``_jsi``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.protocol.parser import AWAITING_CONTROL_LINE, MAX_CONTROL_LINE_SIZE, Parser

__all__ = [
    "DATA_HEADER_LINE",
    "DeliveringClient",
    "Delivery",
    "Sink",
    "header_of",
    "parse_header_block",
    "status_of",
    "unsubscribe",
]

Sink = Callable[[int, bytes, bytes, bytes, "bytes | None"], bool]
"""Takes ``(sid, subject, reply, payload, raw headers or None)``; False: not taken."""

DATA_HEADER_LINE = b"NATS/1.0\r\n"
"""How a header block without an inline status begins (JetStream's data deliveries)."""
_STATUS_LINE = b"NATS/1.0 "
_WHITESPACE = re.compile(r"\s")

log = structlog.get_logger(__name__)


class DeliveringClient(NATS):
    """nats-py's client, with direct delivery for registered subscriptions (module
    docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._ps = _FrameParser(self)  # created once here; nats-py resets it on reconnect
        self._direct: dict[int, tuple[Subscription, Sink]] = {}
        self.direct_deliveries = 0
        """Messages a sink took (a fallback to nats-py's path does not count)."""
        self.delivery_failures = 0
        """Messages dropped because handing them on raised (:class:`_FrameParser`)."""

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

    def _take_directly(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                       headers: bytes | None) -> bool:
        """Hand a message to its subscription's sink, if it has one that takes it."""
        route = self._direct.get(sid)
        if route is None:
            return False
        sub, sink = route
        if self._subs.get(sid) is not sub or not sink(sid, subject, reply, data, headers):
            return False
        # The bookkeeping nats-py's path does for such a subscription.
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        sub._received += 1
        self.direct_deliveries += 1
        return True

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes | None) -> None:
        if not self._take_directly(sid, subject, reply, data, headers):
            # nats-py's parser passes None for no headers (its annotation says bytes).
            await super()._process_msg(sid, subject, reply, data,
                                       headers)  # type: ignore[arg-type]


class _FrameParser(Parser):
    """nats-py's protocol parser, with a quicker loop for the frames that carry messages.

    nats-py's ``Parser.parse`` tries a regular expression per protocol operation and
    keeps each frame's arguments in a dict, ~6 µs per message measured. Here, while
    the buffer starts with a whole, well-formed ``MSG``/``HMSG`` frame, the frame is
    split by hand and its message handed on exactly as nats-py's parser hands it
    (``_process_msg(sid, subject, reply, payload, headers or None)``), a registered
    subscription's straight to its sink (no coroutine per message). A frame not yet
    whole waits in the buffer for the next read; anything else (``PING``, ``INFO``,
    ``-ERR``, a frame these checks do not accept, a frame nats-py's parser began) is
    nats-py's ``parse``, unchanged. tests/unit/test_direct_delivery_parsing.py feeds
    both parsers the same streams cut at every point and compares what they hand on.
    """

    nc: DeliveringClient

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        nc = self.nc
        while buf and self.state == AWAITING_CONTROL_LINE:
            if buf.startswith(b"HMSG "):
                skip = 5
            elif buf.startswith(b"MSG "):
                skip = 4
            else:
                break
            eol = buf.find(b"\r\n", 0, MAX_CONTROL_LINE_SIZE)
            if eol < 0:
                if len(buf) < MAX_CONTROL_LINE_SIZE:
                    return  # the rest of the control line is yet to come
                break
            args = bytes(buf[skip:eol]).split()
            if skip == 5 and len(args) in (4, 5):  # HMSG subject sid [reply] hlen total
                hlen, total = args[-2], args[-1]
            elif skip == 4 and len(args) in (3, 4):  # MSG subject sid [reply] total
                hlen, total = b"0", args[-1]
            else:
                break
            if not (args[1].isdigit() and hlen.isdigit() and total.isdigit()):
                break
            sid = int(args[1])
            start = eol + 2
            h = int(hlen)
            end = start + int(total)
            if len(buf) < end + 2:
                return  # the rest of the frame is yet to come
            subject = args[0]
            reply = args[2] if len(args) == (5 if skip == 5 else 4) else b""
            headers = bytes(buf[start:start + h]) if h > 0 else None
            payload = bytes(buf[start + h:end])
            del buf[:end + 2]
            try:
                if not nc._take_directly(sid, subject, reply, payload, headers):
                    await nc._process_msg(sid, subject, reply, payload, headers)
                    if self.buf is not buf:
                        return  # reset meanwhile (a reconnect): what is left was the old link's
            except Exception as exc:  # any message, whatever it holds
                # nats-py's read loop ends on any exception from the parser, and with it
                # every delivery on this connection until pings notice. One message that
                # cannot be handed on is dropped here instead; a JetStream delivery is
                # not acked, so it comes again after ack_wait.
                nc.delivery_failures += 1
                log.error("delivery_dropped", sid=sid, subject=repr(subject)[2:-1],
                          error=f"{type(exc).__name__}: {exc}")
        if buf:
            await super().parse()


async def unsubscribe(nc: NATS, sub: Subscription) -> None:
    """End ``sub``: its direct delivery first (if ``nc`` delivers it directly), then the
    subscription itself, quietly if the connection is already gone."""
    if isinstance(nc, DeliveringClient):
        nc.stop_delivering(sub)
    with contextlib.suppress(Exception):  # the connection may already be gone
        await sub.unsubscribe()


def status_of(headers: bytes | None) -> str | None:
    """The inline status (``"404"``, ``"408"``, ``"100"``...) of a raw header block,
    as nats-py reads it into ``headers["Status"]``; None if it has none."""
    if headers is None or not headers.startswith(_STATUS_LINE):
        return None
    status = headers[9:12].strip()
    return status.decode() if status.isdigit() else None


def header_of(msg: Msg, name: str) -> str | None:
    """``msg.headers.get(name)``, without parsing a :class:`Delivery`'s raw block when
    that block holds ``name`` at most once, as a whole line's name (``<name>:`` right
    after a line break). The ingest reads two headers of every delivery, a fleet's
    batch has one, and the parse cost ~2.3 µs a message (measured). Anything less plain
    is parsed, so the answer is always :func:`parse_header_block`'s (``name`` is a
    header name as written: no whitespace or colon)."""
    if type(msg) is Delivery and not msg._parsed:
        raw = msg._raw_headers
        assert raw is not None
        key = name.encode()
        found = raw.count(key)
        if not found:
            return None
        if found == 1 and (at := raw.find(b"\r\n" + key + b":")) >= 0:
            start = at + len(key) + 3
            end = raw.find(b"\r\n", start)
            value = raw[start:] if end < 0 else raw[start:end]
            return value.strip().decode("utf-8", "replace")
    headers = msg.headers
    return None if headers is None else headers.get(name)


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
        self._client, self._sid, self.data = client, sid, data
        self.subject, self.reply = subject, reply
        self._metadata, self._ackd = None, False
        self._raw_headers, self._parsed = raw_headers, raw_headers is None
        self._headers: dict[str, str] | None = None

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
