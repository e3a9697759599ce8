"""A fleet in one process for desired-state tests: the control plane, and per edge a
Kubernetes emulator with a tiny Deployment controller, a bridge that trusts the plane.

kmock stores objects and applies patches, but no controller runs in it. Here a
PATCH of a Deployment bumps ``metadata.generation`` (as the API server does) and
:class:`FleetController` plays the Deployment controller: each new generation
gets a status with every replica updated and available - unless a container's
image contains ``broken``, whose pods never become available (an image that
cannot be pulled).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import attrs
import httpx
import kmock

from broker.settings import BridgeSettings
from edge_bridge.bridge import Bridge
from tests.integration.control_harness import DEPLOYMENTS, ControlPlane, Kube, kube_emulator
from tests.integration.harness import running_bridge
from tests.support import until, until_in

__all__ = [
    "BROKEN", "Fleet", "FleetController", "GenerationalEmulator", "console_page", "fleet_edges",
]

BROKEN = "registry.local/web:broken"


@attrs.define(kw_only=True)
class GenerationalEmulator(kmock.KubernetesEmulator):
    """Bumps a Deployment's ``metadata.generation`` on every PATCH that reaches it."""

    async def _handle(self, request: kmock.Request) -> Any:  # type: ignore[override]
        response = await super()._handle(request)
        if request.method == "PATCH" and request.name and request.resource is not None \
                and request.resource.plural == "deployments":
            with contextlib.suppress(KeyError):
                obj = self.objects[DEPLOYMENTS, request.namespace, request.name]
                generation = int((obj.raw.get("metadata") or {}).get("generation") or 1)
                obj.patch({"metadata": {"generation": generation + 1}})
        return response


def settle(kube: Kube) -> None:
    """One pass of the Deployment controller over one emulator."""
    for key in list(kube.emulator.objects.keys()):
        if key[0].plural != "deployments":
            continue
        obj = kube.emulator.objects[key]
        raw = obj.raw
        generation = int((raw.get("metadata") or {}).get("generation") or 1)
        status = raw.get("status") or {}
        if status.get("observedGeneration") == generation:
            continue
        replicas = int((raw.get("spec") or {}).get("replicas") or 0)
        images = [c.get("image", "") for c in
                  raw["spec"]["template"]["spec"].get("containers", [])]
        available = 0 if any("broken" in i for i in images) else replicas
        obj.patch({"status": {"observedGeneration": generation, "replicas": replicas,
                              "updatedReplicas": replicas, "availableReplicas": available}})


@dataclass
class FleetController:
    kubes: list[Kube] = field(default_factory=list)

    async def run_forever(self) -> None:
        while True:
            for kube in self.kubes:
                settle(kube)
            await asyncio.sleep(0.02)


@dataclass
class Fleet:
    plane: ControlPlane
    kubes: dict[str, Kube]
    bridges: dict[str, Bridge]
    stack: contextlib.AsyncExitStack
    control: dict[str, Any]

    def image(self, edge: str) -> str:
        return str(self.kubes[edge].obj(DEPLOYMENTS, "prod", "web")["spec"]["template"][
            "spec"]["containers"][0]["image"])

    def replicas(self, edge: str) -> int:
        return int(self.kubes[edge].obj(DEPLOYMENTS, "prod", "web")["spec"]["replicas"])

    def images_ever(self, edge: str) -> set[str]:
        """Every image the edge's app container had, in any version of the object."""
        history = self.kubes[edge].emulator.objects[DEPLOYMENTS, "prod", "web"].history
        return {v.raw["spec"]["template"]["spec"]["containers"][0]["image"]
                for v in history if v is not None}

    def settings(self, edge: str) -> BridgeSettings:
        return self.plane.bridge_settings(edge, kubeconfig=self.kubes[edge].kubeconfig,
                                          **self.control)

    async def start(self, edge: str) -> Bridge:
        bridge = await self.stack.enter_async_context(
            running_bridge(self.settings(edge), self.plane.nats_url))
        self.bridges[edge] = bridge
        assert bridge.control is not None
        reconciler = bridge.control.desired
        await until(reconciler.ready.is_set, timeout=30, message=f"{edge} never followed "
                    "its desired state")
        return bridge

    async def label(self, edge: str, **labels: str) -> None:
        response = await self.plane.http.put(f"/v1/edges/{edge}/labels",
                                             json={"labels": labels})
        assert response.status_code == 200, response.text

    async def set_group(self, group: str, document: dict[str, Any], **extra: Any) -> int:
        response = await self.plane.http.post(f"/v1/desired/groups/{group}",
                                              json={"document": document, **extra})
        assert response.status_code == 201, response.text
        return int(response.json()["id"])

    async def rollout(self, version_id: int, **options: Any) -> int:
        response = await self.plane.http.post("/v1/rollouts",
                                              json={"version_id": version_id, **options})
        assert response.status_code == 201, response.text
        return int(response.json()["id"])

    async def status(self, rollout_id: int) -> dict[str, Any]:
        response = await self.plane.http.get(f"/v1/rollouts/{rollout_id}")
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()
        return found

    async def wait_rollout(self, rollout_id: int, *states: str, timeout: float = 30
                           ) -> dict[str, Any]:
        return await until_in(lambda: self.status(rollout_id), "state", states,
                              timeout=timeout, what=f"rollout never {states}")

    async def edge_view(self, edge: str) -> dict[str, Any]:
        response = await self.plane.http.get(f"/v1/desired/edges/{edge}")
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()
        return found


@contextlib.asynccontextmanager
async def fleet_edges(plane: ControlPlane, tmp_path: Path, edges: list[str], *,
                      start: bool = True, **control: Any) -> AsyncIterator[Fleet]:
    """An emulator per edge (and its controller), and a running bridge per edge unless
    ``start`` is false (start them with :meth:`Fleet.start`). ``control`` overrides
    the bridges' ControlSettings."""
    controller = FleetController()
    async with contextlib.AsyncExitStack() as stack:
        kubes: dict[str, Kube] = {}
        for edge in edges:
            kubes[edge] = await stack.enter_async_context(
                kube_emulator(tmp_path, GenerationalEmulator()))
            obj = kubes[edge].emulator.objects[DEPLOYMENTS, "prod", "web"]
            obj.patch({"metadata": {"generation": 1}})
            controller.kubes.append(kubes[edge])
        for kube in controller.kubes:
            settle(kube)
        task = asyncio.create_task(controller.run_forever())
        stack.callback(task.cancel)
        fleet = Fleet(plane=plane, kubes=kubes, bridges={}, stack=stack,
                      control={"desired_health_timeout_s": 10.0, **control})
        if start:
            await asyncio.gather(*(fleet.start(edge) for edge in edges))
        yield fleet


async def console_page(plane: ControlPlane, path: str) -> str:
    """``path`` of the operator console, as an operator who logged in through its form."""
    async with httpx.AsyncClient(base_url=plane.api.url, follow_redirects=True) as browser:
        login = await browser.post("/ui/login", data={"token": plane.token, "next": path})
        assert login.status_code == 200, login.text
        return login.text
