"""Commands sent while the bridge is down: delivered in order when it returns, unless
they expired first - then `expired`, and never applied."""

from __future__ import annotations

from pathlib import Path

from broker.runtime.embedded_nats import EmbeddedNats
from tests.helpers import until
from tests.integration.control_harness import DEPLOYMENTS, control_plane, kube_emulator
from tests.integration.harness import running_bridge

WEB = {"namespace": "prod", "name": "web"}


async def test_commands_sent_while_the_bridge_is_down_apply_on_return_unless_expired(
        tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str) -> None:
    """Two scales and a short-lived image change go out while the bridge is stopped. The
    image change's TTL passes: the cloud marks it `expired`, and when the bridge starts
    it refuses it too (report `expired`, image untouched). The scales apply, in order."""
    async with (
        kube_emulator(tmp_path) as kube,
        control_plane(tmp_path, nats_server.url, pg_dsn, kubeconfig=kube.kubeconfig) as plane,
    ):
        settings = plane.bridge_settings()
        async with running_bridge(settings, nats_server.url):
            await plane.wait_edge("edge-1")
        # The bridge is down now.
        first = await plane.issue("edge-1", "deployment.scale", {**WEB, "replicas": 3})
        doomed = await plane.issue("edge-1", "deployment.set_image",
                                   {**WEB, "container": "app", "image": "never:applied"},
                                   ttl_seconds=1)  # the API's minimum
        second = await plane.issue("edge-1", "deployment.scale", {**WEB, "replicas": 4})
        expired = await plane.wait_status(doomed, ("expired",), timeout=10)
        assert expired["finished_by"] == "cloud"
        assert expired["reason"] == "not delivered before it expired"
        assert (await plane.command(first))["status"] == "pending"
        assert kube.versions(DEPLOYMENTS, "prod", "web") == 1

        async with running_bridge(settings, nats_server.url):
            one = await plane.wait_status(first)
            two = await plane.wait_status(second)
            assert one["delivered_at"] <= two["delivered_at"]
            assert kube.obj(DEPLOYMENTS, "prod", "web")["spec"]["replicas"] == 4
            # The edge got the expired command too, after the first scale: it said so.
            async def edge_reported() -> bool:
                history = (await plane.command(doomed))["history"]
                return any(h["status"] == "expired" for h in history)

            await until(edge_reported, timeout=10, message="edge never reported the expiry")
        refused = await plane.command(doomed)
        assert refused["status"] == "expired"
        [report] = refused["history"]
        assert report["edge"] == "edge-1" and report["code"] == "expired"
        assert "expired at" in report["reason"]
        assert refused["delivered_at"] is None
        web = kube.obj(DEPLOYMENTS, "prod", "web")
        assert web["spec"]["template"]["spec"]["containers"][0]["image"] == (
            "registry.local/web:1.0")
        assert kube.writes("prod", "web") == 2  # the two scales, nothing else
