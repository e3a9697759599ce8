"""The services' HTTP/1.1 protocol: uvicorn's httptools parser, with a bound on a request's head.

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
"""

from __future__ import annotations

from typing import Any, Final

import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["MAX_HEAD_BYTES", "BoundedHttpToolsProtocol"]

log = structlog.get_logger(__name__)

MAX_HEAD_BYTES: Final = 16 * 1024
"""Longest request line + headers read before the head is complete (h11's bound)."""

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


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that refuses a request head longer than
    :data:`MAX_HEAD_BYTES` (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if (self._in_head and self._head_bytes > MAX_HEAD_BYTES
                and not self.transport.is_closing()):
            log.warning("http_head_refused", bytes=self._head_bytes, limit=MAX_HEAD_BYTES,
                        client=self.client)
            self.transport.write(_REFUSAL)
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # the next request on this connection
        self._head_bytes = 0
