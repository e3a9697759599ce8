"""Each command kind end to end: API -> PostgreSQL -> JetStream -> bridge -> Kubernetes
(emulator) or the bridge itself -> status back through the ingest -> API and CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker.runtime.embedded_nats import EmbeddedNats
from edge_bridge.applying import RESTARTED_AT_ANNOTATION
from tests.integration.control_harness import (
    CONFIGMAPS,
    DEPLOYMENTS,
    Kube,
    control_plane,
    kube_emulator,
)
from tests.integration.harness import running_bridge
from tests.support import until

WEB = {"namespace": "prod", "name": "web"}


def containers(k: Kube) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = k.obj(DEPLOYMENTS, "prod", "web")["spec"]["template"][
        "spec"]["containers"]
    return result


def check_scale(k: Kube, result: dict[str, Any]) -> None:
    assert k.obj(DEPLOYMENTS, "prod", "web")["spec"]["replicas"] == 5
    assert result == {"replicas": 5, "previous_replicas": 2}
    assert containers(k)[0]["image"] == "registry.local/web:1.0"


def check_set_env(k: Kube, result: dict[str, Any]) -> None:
    app, proxy = containers(k)
    # MODE changed, DEBUG removed, NEW appended; REGION, the order, the image and the
    # other container untouched.
    assert app["env"] == [{"name": "MODE", "value": "maintenance"},
                          {"name": "REGION", "value": "eu-1"},
                          {"name": "NEW", "value": "yes"}]
    assert app["image"] == "registry.local/web:1.0"
    assert proxy == {"name": "proxy", "image": "registry.local/proxy:3"}
    assert result["removed"] == ["DEBUG"]


def check_set_image(k: Kube, result: dict[str, Any]) -> None:
    app, proxy = containers(k)
    assert app["image"] == "registry.local/web:2.0"
    assert [e["name"] for e in app["env"]] == ["MODE", "REGION", "DEBUG"]
    assert proxy["image"] == "registry.local/proxy:3"
    assert result["previous_image"] == "registry.local/web:1.0"


def check_restart(k: Kube, result: dict[str, Any]) -> None:
    template = k.obj(DEPLOYMENTS, "prod", "web")["spec"]["template"]
    assert template["metadata"]["annotations"] == {
        "team": "edge", RESTARTED_AT_ANNOTATION: result["restarted_at"]}
    assert template["metadata"]["labels"] == {"app": "web"}
    assert len(template["spec"]["containers"]) == 2


def check_configmap(k: Kube, result: dict[str, Any]) -> None:
    assert k.obj(CONFIGMAPS, "prod", "settings")["data"] == {
        "color": "green", "size": "m", "shape": "round"}
    assert result == {"set": ["color", "shape"], "removed": ["legacy"]}


CASES: list[tuple[str, dict[str, Any], Callable[[Kube, dict[str, Any]], None]]] = [
    ("deployment.scale", {**WEB, "replicas": 5}, check_scale),
    ("deployment.set_env", {**WEB, "container": "app",
                            "env": {"MODE": "maintenance", "DEBUG": None, "NEW": "yes"}},
     check_set_env),
    ("deployment.set_image", {**WEB, "container": "app", "image": "registry.local/web:2.0"},
     check_set_image),
    ("deployment.restart", dict(WEB), check_restart),
    ("configmap.patch", {"namespace": "prod", "name": "settings",
                         "data": {"color": "green", "legacy": None, "shape": "round"}},
     check_configmap),
]


@pytest.mark.parametrize(("kind", "spec", "check"), CASES, ids=[c[0] for c in CASES])
async def test_each_kubernetes_kind_is_applied_and_reported_applied(
        tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str, kind: str,
        spec: dict[str, Any], check: Callable[[Kube, dict[str, Any]], None]) -> None:
    """The emulator's object changes exactly as asked; the API and `edgesync cmd status`
    show `applied` with the result, after `delivered`."""
    async with (
        kube_emulator(tmp_path) as kube,
        control_plane(tmp_path, nats_server.url, pg_dsn, kubeconfig=kube.kubeconfig) as plane,
        running_bridge(plane.bridge_settings(), nats_server.url),
    ):
        await plane.wait_edge("edge-1")
        command_id = await plane.issue("edge-1", kind, spec)
        command = await plane.wait_status(command_id, ("applied", "failed", "rejected"))
        assert command["status"] == "applied", command
        check(kube, command["result"])
        assert command["delivered_at"] is not None and command["finished_at"] is not None
        assert [h["status"] for h in command["history"]] == ["delivered", "applied"]
        shown = await plane.cli("status", command_id, "--json")
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.output)["status"] == "applied"


async def test_bridge_configure_and_the_cli_wait_flow(
        tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str) -> None:
    """`edgesync cmd configure ... --wait` exits 0 once applied and the bridge runs with the
    new settings; `cmd list` shows it; a refused command makes `--wait` exit 1."""
    async with (
        control_plane(tmp_path, nats_server.url, pg_dsn) as plane,
        running_bridge(plane.bridge_settings(), nats_server.url) as bridge,
    ):
        await plane.wait_edge("edge-1")
        sent = await plane.cli("configure", "edge-1", "--batch-max-records", "77",
                               "--linger-ms", "3", "--stream", "alarms:priority=4", "--wait")
        assert sent.exit_code == 0, sent.output
        assert "applied" in sent.output
        assert bridge.shipper.settings.batch_max_records == 77
        assert bridge.settings.policy_for("alarms").priority == 4
        listed = await plane.cli("list", "edge-1", "--json")
        assert [c["status"] for c in json.loads(listed.output)] == ["applied"]
        refused = await plane.cli("scale", "edge-1", "kube-system/coredns", "3", "--wait")
        assert refused.exit_code == 1, refused.output + refused.stderr
        assert "rejected" in refused.output and "not allowed" in refused.output


async def test_a_command_after_a_nats_restart_arrives_without_waiting_out_the_poll(
        tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str) -> None:
    """The bridge waits for its next command with one long pull request (poll_s); NATS
    restarting loses that request, and the reconnect renews it: a command issued after
    the restart is applied long before the old request would have expired."""
    async with (
        control_plane(tmp_path, nats_server.url, pg_dsn) as plane,
        running_bridge(plane.bridge_settings(poll_s=300.0), nats_server.url) as bridge,
    ):
        await plane.wait_edge("edge-1")
        await nats_server.restart()
        assert bridge._nc is not None
        await until(lambda: bridge._nc is not None and bridge._nc.is_connected, timeout=20,
                    message="the bridge reconnected")
        command_id = await plane.issue("edge-1", "bridge.configure", {"batch_max_records": 55})
        command = await plane.wait_status(command_id, ("applied", "failed", "rejected"),
                                          timeout=30)  # far below poll_s
        assert command["status"] == "applied", command
        assert bridge.shipper.settings.batch_max_records == 55
