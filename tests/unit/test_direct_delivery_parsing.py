"""The ingest's protocol parser hands on exactly what nats-py's parser hands on, for the
same bytes read in any pieces: every message (subject, sid, reply, payload, headers)
in order, and every other operation (PING, PONG, INFO, -ERR, +OK) in its place."""

from __future__ import annotations

import random
from typing import Any

import pytest
from nats.errors import ProtocolError
from nats.protocol.parser import Parser

from cloud_ingest.direct_delivery import DeliveringClient

TAKEN_SID = 5
"""The sid the recording client takes directly (the others go to _process_msg)."""


class Recorder:
    """What a parser hands to its client, in order; taking ``TAKEN_SID`` directly."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def _take_directly(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                       headers: bytes | None) -> bool:
        if sid != TAKEN_SID:
            return False
        self.seen.append(("msg", sid, bytes(subject), bytes(reply), data, headers))
        return True

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes | None) -> None:
        self.seen.append(("msg", sid, bytes(subject), bytes(reply), data, headers))

    async def _process_ping(self) -> None:
        self.seen.append(("ping",))

    async def _process_pong(self) -> None:
        self.seen.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.seen.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.seen.append(("err", err))


def frame(sid: int, subject: str, payload: bytes, *, reply: str = "",
          headers: bytes | None = None, op: str | None = None) -> bytes:
    args = f"{subject} {sid}" + (f" {reply}" if reply else "")
    if headers is None and op != "HMSG":
        return f"MSG {args} {len(payload)}\r\n".encode() + payload + b"\r\n"
    hdr = headers or b""
    return (f"HMSG {args} {len(hdr)} {len(hdr) + len(payload)}\r\n".encode()
            + hdr + payload + b"\r\n")


STREAM = b"".join([
    b'INFO {"server_id":"x","max_payload":1048576}\r\n',
    frame(5, "es.rec.e1.s", b"\x92\x01batch", reply="$JS.ACK.R.c.1.10.10.1764552000.3",
          headers=b"NATS/1.0\r\nNats-Msg-Id: e1.s.1.1-10\r\n\r\n"),
    frame(5, "_INBOX.abc.1", b"", headers=b"NATS/1.0 404 No Messages\r\n\r\n"),
    frame(7, "other", b"plain"),
    b"PING\r\n",
    frame(7, "other", b"with reply", reply="r.1"),
    frame(5, "es.rec.e2.s", b"MSG 5 fake 3\r\nHMSG inside the payload\r\n", reply="x.y",
          headers=b"NATS/1.0\r\nEs-Encoding: zstd\r\n\r\n"),
    b"+OK\r\n",
    frame(9, "empty", b""),
    frame(9, "hmsg.zero.headers", b"p", op="HMSG"),
    b"PONG\r\n",
    frame(5, "tabs", b"t").replace(b"MSG tabs 5", b"MSG\ttabs\t5"),  # nats-py's regex path
    frame(5, "two  spaces", b"s").replace(b"two  spaces", b"twospaces  "),
    frame(5, "big", bytes(range(256)) * 40, reply="r.big",
          headers=b"NATS/1.0\r\nA: 1\r\n\r\n"),
    b"-ERR 'Unknown Protocol Operation'\r\n",
    frame(5, "last", b"end"),
])


async def parsed(parser_class: type[Parser], pieces: list[bytes]) -> list[tuple[Any, ...]]:
    client = Recorder()
    parser = parser_class(client)
    for piece in pieces:
        await parser.parse(piece)
    assert not parser.buf  # everything whole was handed on
    return client.seen


def frame_parser() -> type[Parser]:
    parser = DeliveringClient()._ps
    assert type(parser) is not Parser  # the ingest's client parses with its own loop
    return type(parser)


async def test_the_whole_stream_at_once_gives_what_nats_pys_parser_gives() -> None:
    expected = await parsed(Parser, [STREAM])
    assert len([e for e in expected if e[0] == "msg"]) == 11
    assert await parsed(frame_parser(), [STREAM]) == expected


async def test_a_stream_cut_at_any_point_gives_the_same() -> None:
    expected = await parsed(Parser, [STREAM])
    ours = frame_parser()
    for cut in range(1, len(STREAM)):
        assert await parsed(ours, [STREAM[:cut], STREAM[cut:]]) == expected, cut


@pytest.mark.parametrize("seed", range(40))
async def test_a_stream_read_in_random_pieces_gives_the_same(seed: int) -> None:
    rng = random.Random(seed)
    data = STREAM * 3
    cuts = sorted(rng.sample(range(1, len(data)), rng.randint(2, 60)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    assert await parsed(frame_parser(), pieces) == await parsed(Parser, [data])


@pytest.mark.parametrize("bad", [
    b"MSG subject notasid 3\r\nabc\r\n",
    b"HMSG subject 5 x 3\r\nabc\r\n",
    b"NOPE\r\n",
])
async def test_a_malformed_frame_is_refused_as_nats_py_refuses_it(bad: bytes) -> None:
    for parser_class in (Parser, frame_parser()):
        with pytest.raises(ProtocolError):
            await parsed(parser_class, [frame(5, "ok", b"1") + bad])


class FailingOn(Recorder):
    """A client whose sink raises for one subject, as a strict decode once did."""

    delivery_failures = 0

    def _take_directly(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                       headers: bytes | None) -> bool:
        if subject == b"es.rec.e1.s\xff":
            subject.decode()  # UnicodeDecodeError
        return super()._take_directly(sid, subject, reply, data, headers)


async def test_a_message_its_sink_cannot_take_is_dropped_and_the_rest_read_on() -> None:
    """nats-py's read loop ends on any exception from the parser (and with it every
    delivery on the connection): one message a sink raises on is dropped and counted,
    and the frames after it are handed on."""
    client = FailingOn()
    parser = frame_parser()(client)
    await parser.parse(frame(5, "es.rec.e1.a", b"1")
                       + b"MSG es.rec.e1.s\xff 5 1\r\n2\r\n"
                       + frame(5, "es.rec.e1.b", b"3") + b"PING\r\n")
    assert [e[2] for e in client.seen if e[0] == "msg"] == [b"es.rec.e1.a", b"es.rec.e1.b"]
    assert client.seen[-1] == ("ping",)
    assert client.delivery_failures == 1
    assert not parser.buf
