"""The applier's RBAC is minimal: the Role grants exactly what the applier does.

Every Kubernetes command kind is applied through the real ``KubernetesApplier``
against the control tests' kmock emulator (the official client, over HTTP),
including the conflict-retry and missing-object paths. Each request the
emulator saw becomes an RBAC (apiGroup, resource, verb) the way the API
server's authorizer names it; that set must equal the Role's rules.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import kmock
import pytest

from broker.protocol.command_specs import KUBERNETES_KINDS, parse_spec
from broker.protocol.commands import new_envelope
from broker.settings import ControlSettings
from edge_bridge.applying import ApplyFailed, KubernetesApplier
from tests.deploy.rendering import DEPLOY, render
from tests.integration.control_harness import kube_emulator
from tests.integration.test_control_kubernetes import FaultyEmulator

# One realistic command per Kubernetes kind, against the emulator's objects
# (prod/web, prod/settings) - and one against objects that do not exist.
COMMANDS: dict[str, dict[str, Any]] = {
    "deployment.scale": {"namespace": "prod", "name": "web", "replicas": 3},
    "deployment.set_env": {"namespace": "prod", "name": "web",
                           "env": {"MODE": "safe", "DEBUG": None}},
    "deployment.set_image": {"namespace": "prod", "name": "web", "container": "app",
                             "image": "registry.local/web:2.0"},
    "deployment.restart": {"namespace": "prod", "name": "web"},
    "configmap.patch": {"namespace": "prod", "name": "settings",
                        "data": {"color": "red", "legacy": None}},
}
Rule = tuple[str, str, str]   # (apiGroup, resource[/subresource], verb)


def _verb(request: kmock.Request) -> str:
    """The RBAC verb the API server's authorizer derives from a request."""
    method = str(request.method).upper().rsplit(".", 1)[-1]
    if method == "GET":
        if request.name:
            return "get"
        return "watch" if request.params.get("watch") in ("1", "true") else "list"
    if method == "DELETE":
        return "delete" if request.name else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}[method]


def used_rules(emulator: kmock.KubernetesEmulator) -> set[Rule]:
    rules = set()
    for request in emulator:
        assert request.resource is not None, f"non-resource request {request.url}"
        resource = str(request.resource.plural)
        if request.subresource:
            resource += f"/{request.subresource}"
        rules.add((request.resource.group or "", resource, _verb(request)))
    return rules


async def _apply(applier: KubernetesApplier, kind: str, spec: dict[str, Any]) -> None:
    envelope = new_envelope(edge="edge-1", kind=kind, spec=spec, ttl_s=60, issuer="test")
    await applier.apply(parse_spec(kind, spec), envelope, deadline=time.time() + 30)


async def _record(tmp_path: Path, emulator: kmock.KubernetesEmulator,
                  commands: dict[str, dict[str, Any]], *, fail: bool = False) -> set[Rule]:
    async with kube_emulator(tmp_path, emulator) as kube:
        applier = KubernetesApplier(ControlSettings(kubeconfig=kube.kubeconfig))
        try:
            for kind, spec in commands.items():
                if fail:
                    with pytest.raises(ApplyFailed):
                        await _apply(applier, kind, spec)
                else:
                    await _apply(applier, kind, spec)
        finally:
            applier.close()
        return used_rules(kube.emulator)


def granted_rules() -> set[Rule]:
    """The applier Role's rules, expanded, from the rendered edge overlay."""
    roles = [d for d in render("edge-k3s") if d["kind"] == "Role"]
    assert roles
    granted: set[Rule] = set()
    for role in roles:
        for rule in role["rules"]:
            assert not rule.get("resourceNames"), "names are site data: keep them out"
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        assert "*" not in (group, resource, verb)
                        granted.add((group, resource, verb))
    return granted


def test_every_kubernetes_kind_is_exercised() -> None:
    """A new command kind must be added here, so its RBAC is proven too."""
    assert set(COMMANDS) == set(KUBERNETES_KINDS)


async def test_the_role_grants_exactly_what_the_applier_uses(tmp_path: Path) -> None:
    """Applied for real against the emulator (plain runs, 409 retries, and 404s),
    the applier's requests need exactly the Role's rules: none missing, none spare."""
    used = await _record(tmp_path, kmock.KubernetesEmulator(), COMMANDS)
    # Conflicts: every kind retried after a 409 (a fresh read each time).
    used |= await _record(tmp_path, FaultyEmulator(failures=1), COMMANDS)
    # Missing objects: each kind fails with 404 on whatever it asks first.
    ghosts = {kind: {**spec, "name": "ghost"} for kind, spec in COMMANDS.items()}
    used |= await _record(tmp_path, kmock.KubernetesEmulator(), ghosts, fail=True)
    granted = granted_rules()
    assert used == granted, (f"missing from the Role: {sorted(used - granted)}; "
                             f"granted but never used: {sorted(granted - used)}")


def test_the_base_role_is_what_the_overlays_render() -> None:
    """(The overlays take the Role unchanged from deploy/base/applier-rbac.)"""
    assert (DEPLOY / "base" / "applier-rbac" / "role.yaml").exists()
    for overlay in ("edge-k3s", "edge-k3s-site-002"):
        rules = [d["rules"] for d in render(overlay) if d["kind"] == "Role"]
        assert rules and all(r == rules[0] for r in rules)
