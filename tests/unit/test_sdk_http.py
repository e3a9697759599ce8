"""The SDK's HTTP client and connections its bridge closes while they are kept.

A server closes idle keep-alive connections (uvicorn after 5 s), so a client
that keeps a few finds some closed whenever its rate drops. That is not an
outage of the bridge: the request goes on a new connection, with no error and
no retry delay. A server here is a few lines of asyncio on a loopback port, told
per connection what to do, so each case happens every time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from edge_bridge.sdk._http import ExchangeError, StreamPoster
from tests.support import until

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@dataclass
class Server:
    """Answers requests; ``plan[i]`` says what connection ``i`` does with its requests:
    a number of answers, then it closes (after reading one more request unanswered
    when ``drop_next`` holds that connection's index)."""

    plan: list[int]
    drop_next: set[int] = field(default_factory=set)
    connections: int = 0
    requests: int = 0
    closed: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        answers = self.plan[index] if index < len(self.plan) else 1_000
        try:
            for _ in range(answers):
                if not await _read_request(reader):
                    return
                self.requests += 1
                writer.write(ANSWER)
                await writer.drain()
            if index in self.drop_next and await _read_request(reader):
                self.requests += 1  # read, never answered: closed as the request came
        finally:
            writer.close()
            self.closed += 1


async def _read_request(reader: asyncio.StreamReader) -> bool:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return False
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return True


@asynccontextmanager
async def serving(server: Server) -> AsyncIterator[StreamPoster]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    poster = StreamPoster(f"http://127.0.0.1:{port}", content_type="application/msgpack",
                          timeout_s=5.0, max_connections=4)
    try:
        yield poster
    finally:
        await poster.aclose()
        listener.close()
        await listener.wait_closed()


async def test_a_kept_connection_the_bridge_closed_while_idle_is_not_an_error() -> None:
    """The first connection answers once and is closed by the server while kept: the
    next request goes on a new connection and is answered, with no error."""
    server = Server(plan=[1])
    async with serving(server) as poster:
        assert (await poster.post("/r", b"one")).status_code == 200
        await until(lambda: server.closed == 1, timeout=5, message="server closed the first")
        answer = await poster.post("/r", b"two")
    assert answer.status_code == 200
    assert (server.connections, server.requests) == (2, 2)


async def test_a_request_crossing_the_close_of_its_kept_connection_goes_once_more() -> None:
    """The server reads the second request on a kept connection and closes it without
    an answer (its idle timeout crossed the request): sent again on a new connection,
    answered; the server saw it twice (safe: the ingress stores a request once)."""
    server = Server(plan=[1], drop_next={0})
    async with serving(server) as poster:
        assert (await poster.post("/r", b"one")).status_code == 200
        answer = await poster.post("/r", b"two")
    assert answer.status_code == 200
    assert (server.connections, server.requests) == (2, 3)


async def test_a_new_connection_closed_before_its_answer_is_an_error_at_once() -> None:
    """Only a kept connection gets the second try: a new one closed before answering
    fails the request (the caller's retry policy decides), sent once."""
    server = Server(plan=[0], drop_next={0})
    async with serving(server) as poster:
        with pytest.raises(ExchangeError, match="IncompleteReadError"):
            await poster.post("/r", b"one")
    assert (server.connections, server.requests) == (1, 1)


async def test_an_answer_cut_short_is_an_error_not_a_second_try() -> None:
    """A connection closed after part of the answer came is a failed exchange (the
    request arrived): no resend on a new connection."""
    seen = {"connections": 0, "requests": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["connections"] += 1
        while await _read_request(reader):
            seen["requests"] += 1
            if seen["requests"] == 1:
                writer.write(ANSWER)
                await writer.drain()
                continue
            writer.write(ANSWER[:20])  # the status line and part of a header, then the end
            await writer.drain()
            break
        writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    poster = StreamPoster(f"http://127.0.0.1:{port}", content_type="application/msgpack",
                          timeout_s=5.0, max_connections=4)
    try:
        assert (await poster.post("/r", b"one")).status_code == 200
        with pytest.raises(ExchangeError):
            await poster.post("/r", b"two")
    finally:
        await poster.aclose()
        listener.close()
        await listener.wait_closed()
    assert seen == {"connections": 1, "requests": 2}
