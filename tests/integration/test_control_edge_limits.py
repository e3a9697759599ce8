"""The edge's own limits on commands, whatever the cloud signed: a maximum lifetime,
no command older than the edge's memory of applied ids, images only from allowed
registries; and secrets that stay in the edge cluster (env from a Secret reference),
with plain-text env values masked in the API's answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nats
import pytest

from broker.protocol.command_specs import image_repository
from broker.protocol.commands import CommandSigner, load_private_key, new_envelope
from broker.runtime.embedded_nats import EmbeddedNats
from tests.integration.control_harness import DEPLOYMENTS, control_plane, kube_emulator
from tests.integration.harness import running_bridge
from tests.integration.test_control_rejections import wait_report

WEB = {"namespace": "prod", "name": "web"}


def env_of(kube: Any, container: int = 0) -> list[dict[str, Any]]:
    deployment = kube.obj(DEPLOYMENTS, "prod", "web")
    env: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"][
        container]["env"]
    return env


@pytest.mark.parametrize("image, repository", [
    ("nginx", "docker.io/library/nginx"), ("nginx:1.25", "docker.io/library/nginx"),
    ("acme/web:2", "docker.io/acme/web"), ("ghcr.io/acme/web:2", "ghcr.io/acme/web"),
    ("registry.local:5000/web@sha256:ab", "registry.local:5000/web"),
    ("localhost/web", "localhost/web"),
])
def test_image_references_normalise_to_the_repository_they_pull_from(
        image: str, repository: str) -> None:
    assert image_repository(image) == repository


async def test_the_edge_enforces_its_ttl_memory_and_registry_limits(
        tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str) -> None:
    """Each refusal is reported with its code; the cluster is not touched by any."""
    async with (
        kube_emulator(tmp_path) as kube,
        control_plane(tmp_path, nats_server.url, pg_dsn, kubeconfig=kube.kubeconfig) as plane,
        running_bridge(plane.bridge_settings(max_ttl_s=600, allowed_registries=[
            "registry.local", "ghcr.io/acme/*"]), nats_server.url) as bridge,
    ):
        await plane.wait_edge("edge-1")
        # The cloud allows an hour; this edge, ten minutes.
        long_lived = await plane.issue("edge-1", "deployment.scale", {**WEB, "replicas": 5},
                                       ttl_seconds=3600)
        refused = await plane.wait_status(long_lived, ("rejected",))
        assert refused["code"] == "ttl_too_long" and "600" in refused["reason"]

        # Authentic, unexpired, but issued before this edge's memory of ids began (beyond
        # the clock-skew allowance): it might have been applied before a lost volume.
        assert bridge.control is not None
        born = bridge.control.store.created_at
        old = new_envelope(edge="edge-1", kind="deployment.scale", spec={**WEB, "replicas": 6},
                           ttl_s=590, issuer="cloud", now=born - 310)
        signer = CommandSigner(load_private_key(plane.private_key), issuer="cloud")
        nc = await nats.connect(nats_server.url)
        try:
            await nc.jetstream().publish("es.ctl.edge-1", signer.sign(old)[0])
        finally:
            await nc.close()
        report = await wait_report(plane, old.id, "rejected")
        assert report["code"] == "before_memory"

        for image in ("docker.io/evil/web:1", "nginx:1.25", "ghcr.io/other/web:1",
                      "registry.local.evil.com/web:1"):
            denied = await plane.issue("edge-1", "deployment.set_image",
                                       {**WEB, "container": "app", "image": image},
                                       ttl_seconds=60)
            result = await plane.wait_status(denied, ("rejected",))
            assert result["code"] == "not_allowed" and "registry" in result["reason"], image
        assert kube.writes("prod", "web") == 0
        for image in ("registry.local/web:2.0", "ghcr.io/acme/web:3"):
            allowed = await plane.issue("edge-1", "deployment.set_image",
                                        {**WEB, "container": "app", "image": image},
                                        ttl_seconds=60)
            await plane.wait_status(allowed)
        assert kube.obj(DEPLOYMENTS, "prod", "web")["spec"]["template"]["spec"][
            "containers"][0]["image"] == "ghcr.io/acme/web:3"


async def test_env_from_a_secret_reference_and_plain_values_masked_in_answers(
        tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str) -> None:
    async with (
        kube_emulator(tmp_path) as kube,
        control_plane(tmp_path, nats_server.url, pg_dsn, kubeconfig=kube.kubeconfig) as plane,
        running_bridge(plane.bridge_settings(), nats_server.url),
    ):
        await plane.wait_edge("edge-1")
        ref = {"valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}
        command_id = await plane.issue("edge-1", "deployment.set_env", {
            **WEB, "container": "app", "env": {"DB_PASSWORD": ref, "MODE": "s3cr3t-ish",
                                               "DEBUG": None}})
        applied = await plane.wait_status(command_id, timeout=45)  # kmock is slow under load
        assert applied["spec"]["env"] == {"DB_PASSWORD": ref, "MODE": "***", "DEBUG": None}
        listed = (await plane.http.get("/v1/edges/edge-1/commands")).json()
        assert listed[0]["spec"]["env"]["MODE"] == "***"
        env = {e["name"]: e for e in env_of(kube)}
        assert env["DB_PASSWORD"] == {"name": "DB_PASSWORD", **ref}
        assert env["MODE"] == {"name": "MODE", "value": "s3cr3t-ish"}
        assert "DEBUG" not in env
        # The CLI's spelling: KEY=@secret/key.
        result = await plane.cli("set-env", "edge-1", "prod/web", "API_KEY=@api/key",
                                 "--container", "app", "--wait")
        assert result.exit_code == 0, result.output + result.stderr
        env = {e["name"]: e for e in env_of(kube)}
        assert env["API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "api", "key": "key"}}
        # A reference must name both a Secret and a key; anything else is 422.
        bad = await plane.http.post("/v1/edges/edge-1/commands", json={
            "kind": "deployment.set_env",
            "spec": {**WEB, "env": {"X": {"valueFrom": {"secretKeyRef": {"name": "db"}}}}}})
        assert bad.status_code == 422 and bad.json()["error"] == "invalid_request"
