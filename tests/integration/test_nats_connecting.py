"""A service's NATS connection: what it logs, and that its first connect always ends.

nats-py calls the disconnected callback on a deliberate ``close()`` too; every
clean shutdown of a bridge, an ingest or an API used to log ``nats_disconnected``
as a warning, which an operator reads as an outage.

A first connect cut in the middle of its TLS handshake (the server killed just
then) used to leave ``connect_with_retry`` waiting forever inside nats-py: a bridge
started that way never shipped anything until it was restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from pathlib import Path

import structlog

from broker.connecting import close_nats, connect_with_retry
from broker.runtime.certificates import CertificateAuthority
from broker.runtime.embedded_nats import EmbeddedNats
from broker.settings import NatsSettings
from tests.support import until


def _events(logs: list[dict[str, object]], level: str) -> list[object]:
    return [entry["event"] for entry in logs if entry["log_level"] == level]


async def test_closing_the_connection_is_logged_as_a_close_not_an_outage(
    nats_server: EmbeddedNats,
) -> None:
    """Our own close: ``nats_connection_closed`` (info), no warning; the service's
    own disconnected callback still runs."""
    called: list[str] = []

    async def disconnected() -> None:
        called.append("disconnected")

    with structlog.testing.capture_logs() as logs:
        nc = await connect_with_retry(NatsSettings(url=nats_server.url), name="closing",
                                      disconnected_cb=disconnected)
        await close_nats(nc)
    assert "nats_connection_closed" in _events(logs, "info")
    assert _events(logs, "warning") == []
    assert called == ["disconnected"]


async def test_losing_the_server_is_a_warning(tmp_path: Path) -> None:
    """The server going away while connected: ``nats_disconnected`` (warning)."""
    server = EmbeddedNats(tmp_path / "store", log_file=tmp_path / "nats.log")
    await server.start()
    with structlog.testing.capture_logs() as logs:
        nc = await connect_with_retry(NatsSettings(url=server.url, reconnect_wait_s=0.2),
                                      name="losing")
        try:
            await server.stop()
            await until(lambda: "nats_disconnected" in _events(logs, "warning"), timeout=10,
                        message="the lost connection was logged")
        finally:
            await close_nats(nc)
    assert "nats_connection_closed" in _events(logs, "info")


class _HandshakeCutter:
    """A loopback TCP relay to ``upstream_port`` that resets its first connection as
    soon as the client sends its first bytes: after the server's INFO, that is the
    client's TLS ClientHello (what a server killed during a handshake looks like)."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0
        self.cut_chunk = b""

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"nats://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> _HandshakeCutter:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        self.connections += 1
        first = self.connections == 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        for task in (asyncio.create_task(self._pump(up_reader, writer)),
                     asyncio.create_task(self._pump(reader, up_writer, cut=first, back=writer))):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    cut: bool = False, back: asyncio.StreamWriter | None = None) -> None:
        try:
            while chunk := await reader.read(65536):
                if cut and back is not None:
                    self.cut_chunk = chunk
                    sock = back.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    back.transport.abort()  # RST to the client
                    writer.transport.abort()
                    return
                writer.write(chunk)
                await writer.drain()
        except OSError:
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.transport.abort()


async def test_a_first_connect_cut_during_the_tls_handshake_is_tried_again(
    tmp_path: Path,
) -> None:
    """The first attempt's TLS handshake is reset by the peer; the next one gets
    through. (nats-py's own clean-up of the first attempt never returns: without a
    deadline per attempt, ``connect_with_retry`` hung there for good.)"""
    ca = CertificateAuthority(tmp_path / "tls")
    server = ca.issue("nats-server")
    config = tmp_path / "nats.conf"
    config.write_text(f"tls {{ cert_file: {json.dumps(str(server.cert_file))}, "
                      f"key_file: {json.dumps(str(server.key_file))} }}\n")
    async with EmbeddedNats(tmp_path / "store", config_file=config,
                            log_file=tmp_path / "nats.log") as nats_server:
        assert nats_server.url.startswith("nats://")
        upstream = int(nats_server.url.rsplit(":", 1)[1])
        async with _HandshakeCutter(upstream) as relay:
            settings = NatsSettings(url=relay.url, ca_file=ca.ca_file, connect_timeout_s=1,
                                    reconnect_wait_s=0.2)
            with structlog.testing.capture_logs() as logs:
                connecting = asyncio.ensure_future(connect_with_retry(settings, name="cut"))
                try:
                    await until(connecting.done, timeout=60, interval=0.1,
                                message="connect_with_retry never got past the cut handshake")
                finally:
                    connecting.cancel()
                nc = connecting.result()
            try:
                assert relay.cut_chunk[:1] == b"\x16"  # a TLS handshake record was cut
                assert nc.is_connected and relay.connections >= 2
                await nc.publish("hello", b"after the cut")
                await nc.flush(timeout=5)
            finally:
                await close_nats(nc)
    assert "nats_connect_failed" in _events(logs, "warning")
    assert "nats_disconnected" not in _events(logs, "warning")  # no connection was lost
