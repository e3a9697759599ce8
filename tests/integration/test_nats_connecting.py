"""What a service's NATS connection logs: an outage as a warning, its own close not.

nats-py calls the disconnected callback on a deliberate ``close()`` too; every
clean shutdown of a bridge, an ingest or an API used to log ``nats_disconnected``
as a warning, which an operator reads as an outage.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from broker.connecting import close_nats, connect_with_retry
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
