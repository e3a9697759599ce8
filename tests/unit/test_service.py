"""The service skeleton: one lifecycle, one supervisor of root tasks."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker.errors import ClosedError, RootTaskEnded
from broker.service import Lifecycle, Service, Supervisor
from tests.helpers import until


async def _forever(cancelled: list[str], name: str, running: asyncio.Event | None = None
                   ) -> None:
    if running is not None:
        running.set()
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        cancelled.append(name)
        raise


async def test_the_first_root_to_fail_stops_the_others_and_its_error_propagates() -> None:
    """A crashed root cancels its siblings, the ordered shutdown runs, the error is re-raised."""
    cancelled: list[str] = []
    shutdowns: list[str] = []
    crash = asyncio.Event()

    async def crashing() -> None:
        await crash.wait()
        raise RuntimeError("root crashed")

    async def shutdown() -> None:
        shutdowns.append("ran")

    with pytest.raises(RuntimeError, match="root crashed"):
        async with Supervisor("test", shutdown=shutdown) as roots:
            roots.start(_forever(cancelled, "a"), name="a")
            roots.start(crashing(), name="crashing")
            roots.start(_forever(cancelled, "b"), name="b")
            crash.set()
            await roots.wait(asyncio.Event())
    assert sorted(cancelled) == ["a", "b"]
    assert shutdowns == ["ran"]
    assert all(task.done() for task in roots.roots)
    assert roots.culprit is not None and roots.culprit.get_name() == "test:crashing"


async def test_a_root_that_returns_unasked_ends_the_service_with_root_task_ended() -> None:
    """Returning is a failure too: a root runs until stopped, so the service must not limp on."""
    cancelled: list[str] = []

    async def returning() -> None:
        return None

    with pytest.raises(RootTaskEnded, match="returning"):
        async with Supervisor("test") as roots:
            roots.start(_forever(cancelled, "a"), name="a")
            roots.start(returning(), name="returning")
            await roots.wait(asyncio.Event())
    assert cancelled == ["a"]


async def test_the_stop_event_ends_every_root_cleanly_after_the_ordered_shutdown() -> None:
    """Setting stop runs the shutdown, ends every root, and raises nothing."""
    stop = asyncio.Event()
    order: list[str] = []
    finished = asyncio.Event()

    async def drains() -> None:
        await finished.wait()
        order.append("drained")

    async def shutdown() -> None:
        order.append("shutdown")
        finished.set()
        await asyncio.wait(roots.roots, timeout=5)

    async with Supervisor("test", shutdown=shutdown) as roots:
        drain = roots.start(drains(), name="drain")
        roots.start(_forever([], "a"), name="a")
        stop.set()
        await roots.wait(stop)
    assert order == ["shutdown", "drained"]
    assert drain.done() and not drain.cancelled()
    assert roots.culprit is None
    assert all(task.done() for task in roots.roots)


async def test_cancelling_the_serving_task_still_stops_every_root() -> None:
    """A cancelled ``serve`` leaves no root behind, and the cancellation propagates."""
    cancelled: list[str] = []
    running = asyncio.Event()

    async def serve() -> None:
        async with Supervisor("test") as roots:
            roots.start(_forever(cancelled, "a", running), name="a")
            await roots.wait(asyncio.Event())

    task = asyncio.create_task(serve())
    await until(running.is_set, timeout=5)  # the root is inside its wait, not just created
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled == ["a"]


class _Resource(Service):
    kind = "resource"

    def __init__(self, fail_at: str | None = None) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.opened: list[str] = []
        self.closes = 0

    async def _open(self) -> None:
        for step in ("first", "second", "third"):
            if step == self.fail_at:
                raise OSError(f"cannot open {step}")
            self.opened.append(step)
        self._listen("127.0.0.1", 0)

    async def _close(self) -> None:
        self.closes += 1
        self.opened.clear()


async def test_a_start_that_fails_half_way_closes_what_it_opened() -> None:
    """Rollback: the error propagates and whatever was opened is released."""
    service = _Resource(fail_at="third")
    with pytest.raises(OSError, match="cannot open third"):
        async with service:
            pass
    assert service.state is Lifecycle.CLOSED
    assert service.opened == [] and service.closes == 1


async def test_a_service_starts_once_and_closes_once() -> None:
    """close() is idempotent, and reopening a closed service is a clear error."""
    service = _Resource()
    assert service.state is Lifecycle.NEW
    async with service:
        assert service.state is Lifecycle.OPEN
        assert service.port > 0
    await service.close()
    assert service.state is Lifecycle.CLOSED and service.closes == 1
    with pytest.raises(ClosedError, match="resource is closed"):
        async with service:
            pass
    with pytest.raises(ClosedError):
        _ = service.port


async def test_the_embedded_http_server_serves_and_stops_at_once_when_told() -> None:
    """The quieter main loop (one tick a second) still answers with a Date header and
    ends once ``should_exit`` is set."""
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from broker.serving import TICK_S, embedded_server, listen_tcp, wait_started

    async def hello(_: object) -> PlainTextResponse:
        return PlainTextResponse("hi")

    server = embedded_server(Starlette(routes=[Route("/", hello)]))
    sock = listen_tcp("127.0.0.1", 0)
    port = sock.getsockname()[1]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    assert await wait_started(server, task)
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(f"http://127.0.0.1:{port}/")
    assert response.text == "hi" and "date" in response.headers
    server.should_exit = True
    await asyncio.wait_for(task, timeout=TICK_S + 10)
    assert server.should_exit


@contextlib.asynccontextmanager
async def _hello_server() -> AsyncIterator[tuple[Any, int]]:
    """An embedded server answering ``hi`` on ``/``; yields it with its port."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from broker.serving import TICK_S, embedded_server, listen_tcp, wait_started

    async def hello(_: object) -> PlainTextResponse:
        return PlainTextResponse("hi")

    server = embedded_server(Starlette(routes=[Route("/", hello)]))
    sock = listen_tcp("127.0.0.1", 0)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        assert await wait_started(server, task)
        yield server, sock.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=TICK_S + 10)


async def _exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()


async def test_the_embedded_http_server_parses_with_httptools_and_refuses_a_malformed_request(
) -> None:
    """The services' HTTP parser is uvicorn's C one (httptools, a dependency), not h11;
    a request it cannot parse is answered 400 and the server keeps serving."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    async with _hello_server() as (server, port):
        assert issubclass(server.config.http_protocol_class, HttpToolsProtocol)
        bad = await _exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
        assert bad.startswith(b"HTTP/1.1 400 ")
        good = await _exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert good.startswith(b"HTTP/1.1 200 ") and good.endswith(b"hi")


async def test_a_request_head_past_its_bound_is_refused_431_in_json() -> None:
    """A head that passes MAX_HEAD_BYTES without ending gets a 431 with a JSON body and
    a closed connection; a long but bounded head (a 12 KiB header) is still served."""
    from broker.http_protocol import MAX_HEAD_BYTES

    async with _hello_server() as (_, port):
        line = b"X-Filler: " + b"a" * 1000 + b"\r\n"
        unended = b"GET / HTTP/1.1\r\nHost: x\r\n" + line * (MAX_HEAD_BYTES // len(line) + 4)
        answer = await _exchange(port, unended)  # one write: read whole, no reset
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431 ")
        assert b"content-type: application/json" in head
        refusal = json.loads(body)
        assert refusal["error"] == "request_header_fields_too_large"
        assert str(MAX_HEAD_BYTES) in refusal["message"]

        long_ok = (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Long: "
                   + b"b" * (MAX_HEAD_BYTES * 3 // 4) + b"\r\n\r\n")
        assert (await _exchange(port, long_ok)).startswith(b"HTTP/1.1 200 ")


async def test_header_lines_sent_without_end_end_the_connection_not_the_memory() -> None:
    """httptools alone keeps every header line it is sent; a sender that never ends its
    head has its connection closed long before 64 MiB (the sender sees the reset)."""
    async with _hello_server() as (_, port):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        chunk = (b"X-Filler: " + b"a" * 1000 + b"\r\n") * 64
        sent, ended = 0, False
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            while sent < 64 * 1024 * 1024:
                writer.write(chunk)
                sent += len(chunk)
                await asyncio.wait_for(writer.drain(), timeout=10)
        except ConnectionError:
            ended = True
        finally:
            writer.close()
        assert ended, f"still accepted after {sent} bytes of headers"
