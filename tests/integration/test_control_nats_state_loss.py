"""JetStream loses its state under a running control plane: commands flow again
without restarting the bridge, the ingest or the API."""

from __future__ import annotations

import shutil
from pathlib import Path

from broker.runtime.embedded_nats import EmbeddedNats
from tests.integration.control_harness import DEPLOYMENTS, control_plane, kube_emulator
from tests.integration.harness import running_bridge

WEB = {"namespace": "prod", "name": "web"}


async def test_commands_apply_again_after_the_nats_store_is_wiped(
        tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str) -> None:
    """A command applies; nats-server is killed, its store deleted and started empty
    on the same port. The ingest makes the streams again, the bridge finds its control
    consumer gone and binds (here: creates) it again, and the next command applies."""
    async with (
        kube_emulator(tmp_path) as kube,
        control_plane(tmp_path, nats_server.url, pg_dsn, kubeconfig=kube.kubeconfig) as plane,
        running_bridge(plane.bridge_settings(), nats_server.url),
    ):
        await plane.wait_edge("edge-1")
        first = await plane.issue("edge-1", "deployment.scale", {**WEB, "replicas": 3})
        await plane.wait_status(first)

        await nats_server.kill()
        shutil.rmtree(nats_server.store_dir)
        nats_server.store_dir.mkdir()
        await nats_server.start()

        second = await plane.issue("edge-1", "deployment.scale", {**WEB, "replicas": 5})
        await plane.wait_status(second, timeout=30)
        assert kube.obj(DEPLOYMENTS, "prod", "web")["spec"]["replicas"] == 5
