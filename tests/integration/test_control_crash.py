"""A bridge killed (SIGKILL) after it applied a command but before it reported it: after
a restart the command is not applied again, and `applied` still reaches the cloud."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import attrs
import kmock

from broker.runtime.embedded_nats import EmbeddedNats
from edge_bridge.control_store import CONTROL_DB
from tests.helpers import until
from tests.integration.control_harness import DEPLOYMENTS, control_plane, kube_emulator
from tests.support import BridgeProcess


@attrs.define(kw_only=True)
class HoldingEmulator(kmock.KubernetesEmulator):
    """Applies each PATCH at once but holds the answer until ``release`` is set: the
    moment where the cluster has changed and the bridge does not know it yet."""

    patched: asyncio.Event = attrs.field(factory=asyncio.Event)
    release: asyncio.Event = attrs.field(factory=asyncio.Event)

    async def _handle(self, request: kmock.Request) -> object:  # type: ignore[override]
        response = await super()._handle(request)
        if request.method == "PATCH":
            self.patched.set()
            await self.release.wait()
        return response


def edge_state(buffer_dir: Path, command_id: str) -> str | None:
    """What the bridge has on disk about a command (None: nothing yet)."""
    path = buffer_dir / CONTROL_DB
    if not path.exists():
        return None
    with contextlib.closing(sqlite3.connect(path)) as conn:
        row = conn.execute("SELECT state FROM commands WHERE id = ?", (command_id,)).fetchone()
    return None if row is None else str(row[0])


async def test_a_bridge_killed_between_apply_and_report_does_not_apply_twice(
        tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str) -> None:
    """Apply lands in the cluster while NATS is unreachable, the outcome is on the edge's
    disk, the bridge is SIGKILLed; after NATS and the bridge return, JetStream redelivers
    the unacknowledged command, the bridge recognises it and reports `applied` - and the
    Deployment was patched exactly once."""
    emulator = HoldingEmulator()
    async with (
        kube_emulator(tmp_path, emulator) as kube,
        control_plane(tmp_path, nats_server.url, pg_dsn, kubeconfig=kube.kubeconfig) as plane,
    ):
        settings = plane.bridge_settings()
        bridge = BridgeProcess(settings, nats_server.url, tmp_path / "bridge.log")
        await bridge.start()
        try:
            await plane.wait_edge("edge-1")
            command_id = await plane.issue("edge-1", "deployment.scale",
                                           {"namespace": "prod", "name": "web", "replicas": 6})
            await asyncio.wait_for(emulator.patched.wait(), 15)
            assert kube.obj(DEPLOYMENTS, "prod", "web")["spec"]["replicas"] == 6
            await nats_server.stop()  # the report cannot leave the edge now
            emulator.release.set()
            await until(lambda: edge_state(settings.buffer_dir, command_id) == "applied",
                        timeout=10, message="the bridge never recorded the outcome")
            bridge.kill()
            assert (await plane.command(command_id))["status"] != "applied"

            await nats_server.start()
            await bridge.start()
            done = await plane.wait_status(command_id, timeout=20)
            # The report came from the edge's outbox; JetStream also redelivers the
            # unacknowledged command (after ack_wait): it must be recognised, not re-applied.
            await until(lambda: "command_redelivered" in bridge.log_file.read_text(),
                        timeout=10, interval=0.1, message="the command was never redelivered")
            await until(lambda: plane.status_reports("applied") >= 2, timeout=10,
                        message="the repeated report never reached the cloud")
            done = await plane.command(command_id)
        finally:
            await bridge.stop()
    assert done["result"] == {"replicas": 6, "previous_replicas": 2}
    assert kube.writes("prod", "web") == 1
    assert kube.obj(DEPLOYMENTS, "prod", "web")["spec"]["replicas"] == 6
    assert [h["status"] for h in done["history"] if h["status"] == "applied"] == ["applied"]
    log = (tmp_path / "bridge.log").read_text()
    assert log.count('"command_delivered"') == 1
    assert log.count('"command_applied"') == 1
