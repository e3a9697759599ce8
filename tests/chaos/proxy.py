"""A TCP proxy the chaos harness controls: the network between a bridge and NATS.

Modes, switchable at any time:

- ``pass``: forward both ways, optionally delaying every chunk (latency);
- ``blackhole``: keep connections open and accept new ones, but forward nothing
  (the peer sees silence, not an error: the hardest failure to detect);
- ``drop``: close every connection and refuse new ones (connection refused/reset);
- ``cut()``: close each live connection after forwarding only half of the next
  chunk the client sends (a message cut in the middle).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Literal

__all__ = ["ChaosProxy"]

Mode = Literal["pass", "blackhole", "drop"]


class ChaosProxy:
    def __init__(self, upstream_port: Callable[[], int], *, host: str = "127.0.0.1") -> None:
        self._upstream_port = upstream_port
        self._host = host
        self.mode: Mode = "pass"
        self.latency_s = 0.0
        self._cut_pending = False
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"nats://{self._host}:{self.port}"

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._accept, self._host, port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._close_links()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def set_mode(self, mode: Mode, *, latency_s: float = 0.0) -> None:
        self.mode = mode
        self.latency_s = latency_s
        if mode == "drop":
            self._close_links()

    def cut(self) -> None:
        """Cut every live connection in the middle of the client's next chunk."""
        self._cut_pending = True

    def _close_links(self) -> None:
        for client, upstream in list(self._links):
            for writer in (client, upstream):
                with contextlib.suppress(Exception):
                    writer.transport.abort()
        self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "drop":
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self._host, self._upstream_port()
            )
        except OSError:
            writer.transport.abort()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connections += 1
        link = (writer, up_writer)
        self._links.add(link)
        for task in (
            asyncio.create_task(self._pump(reader, up_writer, link, from_client=True)),
            asyncio.create_task(self._pump(up_reader, writer, link, from_client=False)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    link: tuple[asyncio.StreamWriter, asyncio.StreamWriter], *,
                    from_client: bool) -> None:
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                if self.mode == "blackhole":
                    continue  # swallowed: the other side hears nothing
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                if from_client and self._cut_pending and len(chunk) > 1:
                    writer.write(chunk[: len(chunk) // 2])
                    with contextlib.suppress(Exception):
                        await writer.drain()
                    self._cut_pending = False
                    for w in link:
                        w.transport.abort()
                    break
                writer.write(chunk)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._links.discard(link)
            for w in link:
                with contextlib.suppress(Exception):
                    w.transport.abort()
