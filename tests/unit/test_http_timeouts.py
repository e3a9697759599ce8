"""The services' HTTP protocol does not wait for ever for a request: a connection that
sends nothing, half a head or a stalled body is closed (broker.http_protocol), so that
no one who can reach a port can hold the process's file descriptors; responses that
take long (long polls, live tails) are not cut."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from broker import http_protocol
from broker.serving import TICK_S, embedded_server, listen_tcp, wait_started

HEAD_S = 1.0
BODY_S = 1.5


@pytest.fixture(autouse=True)
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_protocol, "HEAD_TIMEOUT_S", HEAD_S)
    monkeypatch.setattr(http_protocol, "BODY_IDLE_S", BODY_S)


class _App:
    """Routes: ``/`` says hi, ``/echo`` reads its body, ``/slow`` answers after the
    head and body timeouts have passed twice over."""

    def __init__(self) -> None:
        self.disconnected = asyncio.Event()

    def starlette(self) -> Starlette:
        async def hello(_: Request) -> PlainTextResponse:
            return PlainTextResponse("hi")

        async def echo(request: Request) -> PlainTextResponse:
            try:
                body = await request.body()
            except ClientDisconnect:
                self.disconnected.set()
                return PlainTextResponse("", status_code=400)  # never sent: the client is gone
            return PlainTextResponse(body)

        async def slow(_: Request) -> PlainTextResponse:
            await asyncio.sleep(2 * (HEAD_S + BODY_S))
            return PlainTextResponse("late")

        return Starlette(routes=[Route("/", hello), Route("/echo", echo, methods=["POST"]),
                                 Route("/slow", slow)])


@contextlib.asynccontextmanager
async def _server(app: _App) -> AsyncIterator[int]:
    server = embedded_server(app.starlette())
    sock = listen_tcp("127.0.0.1", 0)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        assert await wait_started(server, task)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=TICK_S + 10)


async def _read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (deadline: 10 s)."""
    return await asyncio.wait_for(reader.read(), timeout=10)


async def _answer(port: int, sent: bytes) -> bytes:
    """What the server sends on a new connection after ``sent``, until it closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(sent)
        return await _read_until_closed(reader)
    finally:
        writer.close()


async def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout() -> None:
    async with _server(_App()) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        try:
            answer = await _read_until_closed(reader)
        finally:
            writer.close()
        assert answer == b""  # closed without a word: nothing was asked
        assert time.monotonic() - started >= HEAD_S * 0.9


async def test_a_head_that_stops_half_way_is_answered_408_in_json_and_closed() -> None:
    async with _server(_App()) as port:
        answer = await _answer(port, b"GET / HTTP/1.1\r\nHost: x\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ")
        assert b"content-type: application/json" in head
        assert json.loads(body)["error"] == "request_timeout"


async def test_a_head_dripped_a_byte_at_a_time_is_timed_from_its_start() -> None:
    """A sender that keeps the head alive with a byte now and then is still cut: the
    bound is on the whole head, not on the gap between its bytes."""
    async with _server(_App()) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            with contextlib.suppress(ConnectionError):
                while not reader.at_eof() and time.monotonic() - started < 10:
                    writer.write(b"X")
                    await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(reader.read(1024), timeout=HEAD_S / 4)
        finally:
            writer.close()
        assert reader.at_eof(), "the dripped head was never cut"
        assert time.monotonic() - started < HEAD_S + 5


async def test_a_head_sent_slowly_but_in_time_is_served_then_the_next_one_is_timed_too(
) -> None:
    """Pieces of a head within the bound are served; on the kept-alive connection the
    next request's head is bound again from its own first byte."""
    async with _server(_App()) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for piece in (b"GET / HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(HEAD_S / 10)
            first = await asyncio.wait_for(reader.readuntil(b"hi"), timeout=10)
            assert first.startswith(b"HTTP/1.1 200 ")
            writer.write(b"GET / HTTP/1.1\r\nHo")
            second = await _read_until_closed(reader)
        finally:
            writer.close()
        assert second.startswith(b"HTTP/1.1 408 ")


async def test_a_body_that_stalls_closes_the_connection_and_the_app_sees_the_client_gone(
) -> None:
    app = _App()
    async with _server(app) as port:
        answer = await _answer(port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100"
                                     b"\r\n\r\n" + b"a" * 10)
        assert answer == b""
        await asyncio.wait_for(app.disconnected.wait(), timeout=10)


async def test_a_body_sent_in_pauses_shorter_than_the_bound_is_read_whole() -> None:
    async with _server(_App()) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n"
                         b"Connection: close\r\n\r\n")
            for _ in range(6):  # 6 pauses: their sum passes the bound, none alone does
                await asyncio.sleep(BODY_S / 5)
                writer.write(b"b" * 10)
                await writer.drain()
            answer = await _read_until_closed(reader)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"b" * 60)


async def test_a_response_that_takes_longer_than_both_bounds_is_not_cut() -> None:
    async with _server(_App()) as port:
        answer = await _answer(port, b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close"
                                     b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"late")
