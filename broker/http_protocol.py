"""The services' HTTP/1.1 protocol: uvicorn's httptools parser, with bounds on how much of a
request's head it keeps and how long it waits for a request to arrive.

httptools (uvicorn's C parser) costs far less per request than h11: on the edge path
h11 was ~15 % of the bridge's Python time. But where h11 refuses a request whose line
and headers pass 16 KiB (uvicorn's ``h11_max_incomplete_event_size``), uvicorn's
httptools protocol keeps whatever head it is sent: one connection sending header
lines without end grows the service's memory without end, before any route or token
is checked.

:class:`BoundedHttpToolsProtocol` counts the bytes given to the parser while a
request's head is incomplete, and once they pass :data:`MAX_HEAD_BYTES` answers
``431 Request Header Fields Too Large`` with a JSON body and closes the connection.
The count is checked after each read, so a head that arrives whole in one read (at
most asyncio's read size, 256 KiB) is not refused: memory stays bounded either way.

uvicorn also waits for a request without end: a connection that sends nothing, or half
a head, or a body that stops, holds its socket for as long as the peer likes (uvicorn
times out only the idle gap *between* requests, ``timeout_keep_alive``). Anyone who can
reach the port could so hold every file descriptor the process may open, and the
service would refuse its real clients. So a request's head must be complete within
:data:`HEAD_TIMEOUT_S` of the connection being made or of its first byte (a later
request on a kept-alive connection), and its body must not pause longer than
:data:`BODY_IDLE_S` between reads while the application waits for it (a pause that is
ours, reading paused for back-pressure, does not count). A head that times out is
answered ``408`` with a JSON body (nothing at all when no byte came) and the connection
is closed; a body that stalls has its connection closed, and the application sees the
client gone (``http.disconnect``), as for any cut connection. The response phase has no
such bound: long polls and live tails stay open as long as they run.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["BODY_IDLE_S", "HEAD_TIMEOUT_S", "MAX_HEAD_BYTES", "BoundedHttpToolsProtocol"]

log = structlog.get_logger(__name__)

MAX_HEAD_BYTES: Final = 16 * 1024
"""Longest request line + headers read before the head is complete (h11's bound)."""
HEAD_TIMEOUT_S: Final = 20.0
"""Seconds a request's line and headers may take to arrive whole, from the connection
being made (its TLS handshake done) or from the first byte of a later request."""
BODY_IDLE_S: Final = 30.0
"""Longest pause between two reads of a request's body while the application waits."""

_REFUSAL_BODY: Final = (
    b'{"error":"request_header_fields_too_large","message":"the request line and headers '
    b'exceed ' + str(MAX_HEAD_BYTES).encode() + b' bytes"}'
)
_REFUSAL: Final = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: application/json\r\n"
    b"content-length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n"
    b"connection: close\r\n\r\n" + _REFUSAL_BODY
)

_TIMEOUT_BODY: Final = (
    b'{"error":"request_timeout","message":"the request line and headers did not arrive '
    b'within ' + str(int(HEAD_TIMEOUT_S)).encode() + b' seconds"}'
)
_TIMEOUT: Final = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: application/json\r\n"
    b"content-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n"
    b"connection: close\r\n\r\n" + _TIMEOUT_BODY
)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that refuses a request head longer than
    :data:`MAX_HEAD_BYTES`, and a request slower than :data:`HEAD_TIMEOUT_S` /
    :data:`BODY_IDLE_S` (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._in_body = False
        self._head_bytes = 0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(HEAD_TIMEOUT_S)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._in_head:
            if self._head_bytes:
                log.warning("http_request_timed_out", part="head", bytes=self._head_bytes,
                            limit_s=HEAD_TIMEOUT_S, client=self.client)
                self.transport.write(_TIMEOUT)
            else:  # browsers open spare connections they may never use: not a warning
                log.debug("http_connection_unused", limit_s=HEAD_TIMEOUT_S, client=self.client)
            self.transport.close()
        elif self._in_body:
            if self.flow.read_paused:  # our own back-pressure, not the client's pause
                self._arm(BODY_IDLE_S)
                return
            log.warning("http_request_timed_out", part="body", limit_s=BODY_IDLE_S,
                        client=self.client)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            if self._timer is None:  # a later request's first bytes (after keep-alive)
                self._arm(HEAD_TIMEOUT_S)
            self._head_bytes += len(data)
        elif self._in_body:
            self._arm(BODY_IDLE_S)
        super().data_received(data)
        if (self._in_head and self._head_bytes > MAX_HEAD_BYTES
                and not self.transport.is_closing()):
            log.warning("http_head_refused", bytes=self._head_bytes, limit=MAX_HEAD_BYTES,
                        client=self.client)
            self.transport.write(_REFUSAL)
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._in_body = True  # until on_message_complete, at once for a request without one
        self._arm(BODY_IDLE_S)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()
        self._in_body = False
        self._in_head = True  # the next request on this connection
        self._head_bytes = 0
