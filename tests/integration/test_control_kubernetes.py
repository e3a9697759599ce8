"""The Kubernetes applier against the emulator, through the official client: API errors
become `failed` with the API's message, conflicts are retried a bounded number of times,
and an unreachable API fails the command by its deadline."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import attrs
import kmock
import pytest
from kmock import KubernetesError

from broker.errors import ApplyFailed
from broker.protocol.command_specs import parse_spec
from broker.protocol.commands import CommandEnvelope, new_envelope
from broker.settings import ControlSettings
from edge_bridge.applying import KubernetesApplier
from tests.integration.control_harness import DEPLOYMENTS, kube_emulator
from tests.support import refused_port

CONFLICT = KubernetesError(
    status=409, reason="Conflict",
    message='Operation cannot be fulfilled on deployments.apps "web": the object has been '
    "modified; please apply your changes to the latest version and try again")
FORBIDDEN = KubernetesError(
    status=403, reason="Forbidden",
    message='deployments.apps "web" is forbidden: User "system:serviceaccount:edge:bridge" '
    'cannot patch resource "deployments" in API group "apps" in the namespace "prod"')


@attrs.define(kw_only=True)
class FaultyEmulator(kmock.KubernetesEmulator):
    """Answers the first ``failures`` PATCHes with ``error``, before changing anything."""

    error: KubernetesError = CONFLICT
    failures: int = 0
    refused: int = 0

    async def _handle(self, request: kmock.Request) -> Any:  # type: ignore[override]
        if request.method == "PATCH" and self.refused < self.failures:
            self.refused += 1
            raise self.error
        return await super()._handle(request)


def command(kind: str, spec: dict[str, Any]) -> tuple[Any, CommandEnvelope]:
    env = new_envelope(edge="edge-1", kind=kind, spec=spec, ttl_s=60, issuer="test")
    return parse_spec(kind, spec), env


async def apply(kubeconfig: Path, kind: str, spec: dict[str, Any], *,
                deadline_s: float = 30, **settings: Any) -> tuple[dict[str, Any], int]:
    """Apply one command; returns its result and how many conflicts were retried."""
    conflicts = 0

    def counted() -> None:
        nonlocal conflicts
        conflicts += 1

    applier = KubernetesApplier(ControlSettings(kubeconfig=kubeconfig, **settings),
                                on_conflict=counted)
    parsed, env = command(kind, spec)
    try:
        result = await applier.apply(parsed, env, deadline=time.time() + deadline_s)
    finally:
        applier.close()
    return result, conflicts


SET_ENV = {"namespace": "prod", "name": "web", "env": {"MODE": "safe"}}


async def test_conflicts_are_retried_on_a_fresh_read_until_the_write_lands(
        tmp_path: Path) -> None:
    emulator = FaultyEmulator(failures=2)
    async with kube_emulator(tmp_path, emulator) as kube:
        result, conflicts = await apply(kube.kubeconfig, "deployment.set_env", SET_ENV)
        assert conflicts == 2
        assert result["containers"] == ["app", "proxy"]
        app, proxy = kube.obj(DEPLOYMENTS, "prod", "web")["spec"]["template"]["spec"][
            "containers"]
        assert app["env"][0] == {"name": "MODE", "value": "safe"}
        assert proxy["env"] == [{"name": "MODE", "value": "safe"}]
        assert kube.writes("prod", "web") == 3
        reads = sum(1 for r in kube.emulator if r.method == "GET" and r.name == "web")
        assert reads == 3  # each attempt recomputed its indices from a fresh read


async def test_a_conflict_that_persists_fails_after_the_retry_budget(tmp_path: Path) -> None:
    emulator = FaultyEmulator(failures=100)
    async with kube_emulator(tmp_path, emulator) as kube:
        with pytest.raises(ApplyFailed, match=r"conflict persisted after 3 attempts: .*the "
                                              r"object has been modified"):
            await apply(kube.kubeconfig, "deployment.scale",
                        {"namespace": "prod", "name": "web", "replicas": 9},
                        conflict_retries=2)
        assert kube.writes("prod", "web") == 3
        assert kube.obj(DEPLOYMENTS, "prod", "web")["spec"]["replicas"] == 2


async def test_forbidden_fails_with_the_api_servers_message(tmp_path: Path) -> None:
    emulator = FaultyEmulator(error=FORBIDDEN, failures=100)
    async with kube_emulator(tmp_path, emulator) as kube:
        with pytest.raises(ApplyFailed) as info:
            await apply(kube.kubeconfig, "deployment.restart",
                        {"namespace": "prod", "name": "web"})
        assert str(info.value) == f"HTTP 403: {FORBIDDEN.message}"
        assert kube.writes("prod", "web") == 1  # not retried
        assert kube.versions(DEPLOYMENTS, "prod", "web") == 1


@pytest.mark.parametrize(("kind", "spec"), [
    ("deployment.scale", {"namespace": "prod", "name": "ghost", "replicas": 1}),
    ("configmap.patch", {"namespace": "prod", "name": "ghost", "data": {"a": "b"}}),
])
async def test_a_missing_object_fails_with_404_and_the_message(
        tmp_path: Path, kind: str, spec: dict[str, Any]) -> None:
    async with kube_emulator(tmp_path) as kube:
        with pytest.raises(ApplyFailed, match=r"^HTTP 404: The object is not found"):
            await apply(kube.kubeconfig, kind, spec)


async def test_a_missing_container_fails_without_writing(tmp_path: Path) -> None:
    async with kube_emulator(tmp_path) as kube:
        with pytest.raises(ApplyFailed, match="container 'db' not found"):
            await apply(kube.kubeconfig, "deployment.set_image",
                        {"namespace": "prod", "name": "web", "container": "db", "image": "x:1"})
        assert kube.writes("prod", "web") == 0


async def test_an_unreachable_api_fails_by_the_deadline(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    with refused_port() as port:
        kubeconfig.write_text(
            '{"apiVersion": "v1", "kind": "Config", "current-context": "c",'
            f' "clusters": [{{"name": "c", "cluster": {{"server": "http://127.0.0.1:{port}"}}}}],'
            ' "users": [{"name": "u", "user": {}}],'
            ' "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}')
        started = time.monotonic()
        with pytest.raises(ApplyFailed, match="Kubernetes API unavailable"):
            await apply(kubeconfig, "deployment.scale",
                        {"namespace": "prod", "name": "web", "replicas": 1}, deadline_s=1.0)
    assert time.monotonic() - started < 5


async def test_a_bad_kubeconfig_fails_the_command_not_the_bridge(tmp_path: Path) -> None:
    with pytest.raises(ApplyFailed, match="cannot load Kubernetes configuration"):
        await apply(tmp_path / "missing-kubeconfig", "deployment.restart",
                    {"namespace": "prod", "name": "web"})

