"""Serving an ASGI app inside a service that owns its own signals and socket: the
listener, the embedded uvicorn server, its ready-wait, and the JSON refusal every
HTTP surface answers an :class:`~broker.errors.EdgesyncError` with."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator, Mapping
from typing import Any, Final

import uvicorn
from starlette.responses import JSONResponse

from broker.errors import EdgesyncError, http_status, retry_after_s
from broker.http_protocol import BoundedHttpToolsProtocol

__all__ = [
    "HTTP_DRAIN_S",
    "HTTP_GRACEFUL_S",
    "TICK_S",
    "EmbeddedServer",
    "embedded_server",
    "error_response",
    "listen_tcp",
    "wait_started",
]

HTTP_GRACEFUL_S: Final = 5
"""Seconds uvicorn gives in-flight requests to finish once told to exit."""

TICK_S: Final = 1.0
"""How often an idle embedded server wakes (uvicorn's own loop: every 0.1 s)."""

HTTP_DRAIN_S: Final = 8.0
"""Seconds a service waits at shutdown for its HTTP server to stop: the graceful
period plus time to close connections, well inside the 20 s shutdown deadline."""


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves SIGINT/SIGTERM to the service embedding it,
    and that idles quietly.

    uvicorn normally installs its own handlers and re-raises the signal after
    it stops, which would bypass our ordered shutdown. Its main loop also wakes
    every 0.1 s to see whether it should exit (ten wake-ups a second of an idle
    bridge, most of its idle CPU); here it wakes once a second for its Date
    header, and at once when told to exit.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        self._exit_requested = asyncio.Event()
        super().__init__(config)

    @property
    def should_exit(self) -> bool:
        return self._exit_requested.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self._exit_requested.set()
        else:
            self._exit_requested.clear()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            # on_tick refreshes the Date header when counter % 10 == 0: every tick.
            counter += 10
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit_requested.wait(), timeout=TICK_S)


def embedded_server(app: Any, *, graceful_s: int = HTTP_GRACEFUL_S) -> EmbeddedServer:
    """An :class:`EmbeddedServer` for ``app``; call ``serve(sockets=[sock])`` on it."""
    # httptools (uvicorn's C parser, a dependency) rather than h11: parsing is per
    # request, and on the edge path h11 cost ~20 % of the bridge's CPU per record. Its
    # protocol bounds a request's head, as h11 did (broker.http_protocol).
    # proxy_headers off: the client of a request (the audit log's, the login log's) is
    # its TCP peer. uvicorn's default believed X-Forwarded-For from 127.0.0.1, so under
    # `edgesync up` any local process could name itself 6.6.6.6 in the audit log.
    config = uvicorn.Config(
        app, http=BoundedHttpToolsProtocol, log_config=None, access_log=False, lifespan="off",
        timeout_graceful_shutdown=graceful_s, proxy_headers=False,
    )
    return EmbeddedServer(config)


async def wait_started(server: uvicorn.Server, task: asyncio.Task[None]) -> bool:
    """Wait until ``server`` listens, or until ``task`` (its ``serve``) has ended.

    Returns:
        Whether the server is listening; False means its task ended first (the
        service's supervisor then sees that root end and re-raises its error).
    """
    # uvicorn offers a flag, not an event, for "listening".
    while not server.started and not task.done():  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    return bool(server.started) and not task.done()


def listen_tcp(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket whose accepted connections get TCP_NODELAY.

    ``socket.create_server`` makes sockets with ``proto=0``, and asyncio only turns
    Nagle's algorithm off for sockets whose proto is ``IPPROTO_TCP``: without this,
    every response on a kept-alive connection waits ~40 ms for a delayed ACK.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def error_response(
    exc: EdgesyncError, *, message: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The refusal ``{"error": exc.code, "message": text}`` for ``exc``.

    The status comes from :data:`broker.errors.HTTP_STATUS`; errors worth retrying
    (buffer full, shutting down, temporarily unavailable) carry ``Retry-After``.
    """
    all_headers = dict(headers or {})
    retry_after = retry_after_s(exc)
    if retry_after is not None:
        all_headers.setdefault("Retry-After", str(retry_after))
    body: dict[str, object] = {
        "error": exc.code, "message": str(exc) if message is None else message, **exc.details()}
    return JSONResponse(body, status_code=http_status(exc), headers=all_headers or None)
