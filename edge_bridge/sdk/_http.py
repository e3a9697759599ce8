"""How the SDK posts a request to its bridge: a small keep-alive HTTP/1.1 client.

The SDK sends one kind of request (``POST`` of a MessagePack body) to one local
server, so it does not need a general HTTP client. A profile of the edge path
showed httpx + httpcore taking about a third of the SDK's CPU (request and
response models, the connection pool's events, a failing ``import sniffio``
per request, an SSL context per client even for ``http://``); this module
does the one exchange with asyncio streams, reusing up to ``max_connections``
connections.

Any failure of an exchange (connect, reset, timeout, a response that does not
parse) raises :class:`ExchangeError` and discards the connection: the caller
decides whether to retry, as it did for ``httpx.RequestError``.

A kept connection the bridge has closed meanwhile is not a failure of the
bridge: servers close idle keep-alive connections (uvicorn after 5 s), so a
client with a few connections finds some of them closed whenever its rate
drops. Such a connection is dropped before use (the close has arrived: its
reader is at EOF), and a request that a kept connection failed before any byte
of an answer came (the close crossed the request on the way) is sent once more
on a new connection. That resend is safe: the ingress stores a request at most
once, by ``(producer, request_seq)``, and answers a repeat with its first answer.

Tests substitute an httpx transport (``EdgeClient(transport=...)``);
:class:`HttpxPoster` adapts it to the same interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import httpx

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_HEAD_BYTES",
    "Answer",
    "ExchangeError",
    "HttpxPoster",
    "Poster",
    "StreamPoster",
]

MAX_HEAD_BYTES: Final = 64 * 1024
"""Longest status line + headers accepted from the bridge."""
MAX_BODY_BYTES: Final = 1024 * 1024
"""Longest answer body read; the bridge's answers are a few hundred bytes."""


class ExchangeError(Exception):
    """The exchange failed on the way; the request may or may not have arrived."""


@dataclass(frozen=True, slots=True)
class Answer:
    """The bridge's answer: status, headers (names lower-case) and body."""

    status_code: int
    headers: dict[str, str]
    content: bytes
    reason_phrase: str = ""

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class Poster(Protocol):
    """What the client needs from HTTP."""

    @property
    def base_url(self) -> str: ...

    async def post(self, path: str, body: bytes) -> Answer: ...

    async def aclose(self) -> None: ...


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class StreamPoster:
    """POSTs over asyncio streams with keep-alive; at most ``max_connections`` idle kept."""

    def __init__(
        self, url: str, *, content_type: str, timeout_s: float, max_connections: int,
        token: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host[:port], got {url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        # Only https pays for a TLS context (loading CA certificates takes ~0.1 s).
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._base_url = f"{parts.scheme}://{parts.netloc}"
        self._prefix = (parts.path or "").rstrip("/")
        host_header = parts.netloc.rpartition("@")[2]
        auth = "" if token is None else _authorization_line(token)
        self._head_tail = (
            f"Host: {host_header}\r\nContent-Type: {content_type}\r\n{auth}"
            "User-Agent: edgesync-sdk\r\nContent-Length: "
        )
        self._timeout_s = timeout_s
        self._max_idle = max_connections
        self._idle: list[_Conn] = []

    @property
    def base_url(self) -> str:
        return self._base_url

    async def post(self, path: str, body: bytes) -> Answer:
        request = (f"POST {self._prefix}{path} HTTP/1.1\r\n{self._head_tail}{len(body)}"
                   "\r\n\r\n").encode("latin-1") + body
        conn = self._kept()
        try:
            async with asyncio.timeout(self._timeout_s):
                if conn is not None:
                    try:
                        answer, keep = await _exchange(conn, request)
                    except _ClosedBeforeAnswer:
                        # Closed by the bridge as the request went (module docstring):
                        # once more on a new connection, within the same timeout.
                        conn.close()
                        conn = None
                if conn is None:
                    reader, writer = await asyncio.open_connection(
                        self._host, self._port, ssl=self._ssl, limit=MAX_HEAD_BYTES
                    )
                    conn = _Conn(reader, writer)
                    answer, keep = await _exchange(conn, request)
        except (OSError, EOFError, ValueError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, TimeoutError, _ClosedBeforeAnswer) as exc:
            if conn is not None:
                conn.close()
            cause = exc.__cause__ if isinstance(exc, _ClosedBeforeAnswer) else exc
            raise ExchangeError(f"{type(cause).__name__}: {cause}") from exc
        except BaseException:  # cancelled mid-exchange: the connection is in an unknown state
            if conn is not None:
                conn.close()
            raise
        if keep and len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            conn.close()
        return answer

    def _kept(self) -> _Conn | None:
        """A kept connection the bridge has not closed, if any (closed ones dropped)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            conn.close()
        return None

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for conn in idle:
            with contextlib.suppress(OSError, ssl.SSLError):
                await conn.writer.wait_closed()


class _ClosedBeforeAnswer(Exception):
    """The connection was closed or reset before any byte of the answer came."""


async def _exchange(conn: _Conn, request: bytes) -> tuple[Answer, bool]:
    """Send ``request`` on ``conn`` and read its answer.

    Raises:
        _ClosedBeforeAnswer: (from the ``OSError`` or ``IncompleteReadError``) the
            connection ended before the answer began.
    """
    try:
        conn.writer.write(request)
        await conn.writer.drain()
        head = await conn.reader.readuntil(b"\r\n\r\n")
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise _ClosedBeforeAnswer from exc
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        raise _ClosedBeforeAnswer from exc
    return await _read_answer(head, conn.reader)


async def _read_answer(head: bytes, reader: asyncio.StreamReader) -> tuple[Answer, bool]:
    """One HTTP/1.1 response whose head (status line and headers) came; returns it and
    whether the connection may be reused."""
    lines = head[:-4].decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    status_text, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(status_text) != 3 or not status_text.isdigit():
        raise ValueError(f"not an HTTP/1.x status line: {lines[0][:100]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"malformed header line: {line[:100]!r}")
        headers[name.strip().lower()] = value.strip()
    keep = version != "HTTP/1.0" and headers.get("connection", "").lower() != "close"
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            raise ValueError(f"unusable content-length {length[:30]!r}")
        content = await reader.readexactly(int(length))
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        content = await _read_chunked(reader)
    else:  # delimited by the end of the connection
        content = await reader.read(MAX_BODY_BYTES)
        keep = False
    return Answer(int(status_text), headers, content, reason), keep


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        n = int(line.split(b";", 1)[0].strip() or b"x", 16)
        if n == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        size += n
        if size > MAX_BODY_BYTES:
            raise ValueError("chunked body too long")
        parts.append(await reader.readexactly(n))
        await reader.readexactly(2)


class HttpxPoster:
    """The same interface over an httpx transport (tests use ``httpx.MockTransport``)."""

    def __init__(
        self, url: str, *, transport: httpx.AsyncBaseTransport, content_type: str,
        timeout_s: float, token: str | None = None,
    ) -> None:
        import httpx  # only when a transport is given

        self._request_error = httpx.RequestError
        self._client = httpx.AsyncClient(
            base_url=url, transport=transport, timeout=httpx.Timeout(timeout_s),
            headers={"Content-Type": content_type,
                     **({"Authorization": f"Bearer {token}"} if token else {})},
            trust_env=False,
        )

    @property
    def base_url(self) -> str:
        return str(self._client.base_url).rstrip("/")

    async def post(self, path: str, body: bytes) -> Answer:
        try:
            response = await self._client.post(path, content=body)
        except self._request_error as exc:
            raise ExchangeError(f"{type(exc).__name__}: {exc}") from exc
        headers = {name.lower(): value for name, value in response.headers.items()}
        return Answer(response.status_code, headers, response.content, response.reason_phrase)

    async def aclose(self) -> None:
        await self._client.aclose()


def _authorization_line(token: str) -> str:
    """The ``Authorization`` header line for a producer token (refused if it could
    break the request head: a token is printable ASCII without spaces)."""
    if not token or not all(33 <= ord(c) < 127 for c in token):
        raise ValueError("a producer token is printable ASCII without spaces")
    return f"Authorization: Bearer {token}\r\n"
