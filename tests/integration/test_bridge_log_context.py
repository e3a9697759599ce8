"""Every log line of a bridge carries its edge, bound once through contextvars."""

from __future__ import annotations

from pathlib import Path

import structlog

from broker.runtime.embedded_nats import EmbeddedNats
from tests.helpers import until
from tests.integration.harness import bridge_settings, init_topology, running_bridge


async def test_every_line_a_bridge_logs_names_its_edge(
        tmp_path: Path, nats_server: EmbeddedNats) -> None:
    """Lines from opening, serving (in any root task) and closing carry ``edge``;
    the caller's context is left as it was. (The admin step that creates the
    streams runs first, outside the capture: it is not the bridge's.)"""
    await init_topology(nats_server.url)
    with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]) as lines:
        async with running_bridge(bridge_settings(tmp_path, "edge-ctx"), nats_server.url) as b:
            await until(lambda: b.nats_connected, timeout=10)
        outside = structlog.contextvars.get_contextvars()
    events = {line["event"] for line in lines}
    assert {"buffer_opened", "bridge_started", "bridge_stopped"} <= events
    assert lines and all(line.get("edge") == "edge-ctx" for line in lines), [
        line for line in lines if line.get("edge") != "edge-ctx"]
    assert "edge" not in outside
