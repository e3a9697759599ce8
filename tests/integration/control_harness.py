"""The control plane in a test: a Kubernetes API emulator, the operator API, the ingest,
keys, and bridges that trust them.

The Kubernetes side is kmock's ``KubernetesEmulator`` served over real HTTP, and
the bridge talks to it through the official ``kubernetes`` client via a
kubeconfig file - the same code path as a real cluster. The emulator applies
dict patches as plain JSON merge and JSON Patch as RFC 6902; it keeps every
object version, so a test can assert what changed and what did not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import kmock

from broker.protocol.commands import generate_key_pair
from broker.settings import ApiSettings, BridgeSettings, ControlSettings, NatsSettings
from cloud_ingest.api import Api
from cloud_ingest.service import Ingest
from tests.helpers import until
from tests.integration.harness import bridge_settings, running_ingest, serving
from tests.support import until_in

__all__ = [
    "CONFIGMAPS",
    "DEPLOYMENTS",
    "CliResult",
    "ControlPlane",
    "Kube",
    "control_plane",
    "kube_emulator",
    "run_cli",
    "running_api",
]

DEPLOYMENTS = "apps/v1/deployments"
CONFIGMAPS = "v1/configmaps"
TOKEN = "test-operator-NAOUf9GMaFl9nU3zRxqzfSSmuKK4QMG4"  # strong enough to start


def web_deployment(namespace: str = "prod", name: str = "web") -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1",
                     "labels": {"app": name}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": {"team": "edge"}},
                "spec": {"containers": [
                    {"name": "app", "image": "registry.local/web:1.0", "env": [
                        {"name": "MODE", "value": "normal"},
                        {"name": "REGION", "value": "eu-1"},
                        {"name": "DEBUG", "value": "0"},
                    ]},
                    {"name": "proxy", "image": "registry.local/proxy:3"},
                ]},
            },
        },
    }


@dataclass
class Kube:
    """The emulator and a kubeconfig that points the official client at it."""

    emulator: kmock.KubernetesEmulator
    kubeconfig: Path

    def obj(self, resource: str, namespace: str, name: str) -> dict[str, Any]:
        """The current state of an object."""
        return dict(self.emulator.objects[resource, namespace, name].raw)

    def versions(self, resource: str, namespace: str, name: str) -> int:
        """How many versions the object has had (1 = never changed)."""
        return len(self.emulator.objects[resource, namespace, name].history)

    def writes(self, namespace: str, name: str) -> int:
        """PATCH requests that reached the object (however they were answered)."""
        return sum(1 for r in self.emulator if r.method == "PATCH" and r.name == name
                   and r.namespace == namespace)


@contextlib.asynccontextmanager
async def kube_emulator(tmp_path: Path, emulator: kmock.KubernetesEmulator | None = None
                        ) -> AsyncIterator[Kube]:
    """A served emulator with ``prod/web``, ``kube-system/coredns`` and ``prod/settings``."""
    handler = emulator if emulator is not None else kmock.KubernetesEmulator()
    async with handler as k, kmock.Server(k) as server:
        k.objects[DEPLOYMENTS, "prod", "web"] = web_deployment()
        k.objects[DEPLOYMENTS, "kube-system", "coredns"] = web_deployment("kube-system",
                                                                          "coredns")
        k.objects[CONFIGMAPS, "prod", "settings"] = {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "settings", "namespace": "prod"},
            "data": {"color": "blue", "size": "m", "legacy": "yes"},
        }
        kubeconfig = tmp_path / f"kubeconfig-{secrets.token_hex(3)}"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": str(server.url).rstrip("/")}}],
            "users": [{"name": "edge", "user": {"token": "edge-token"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator",
                                                          "user": "edge"}}],
        }))
        yield Kube(emulator=k, kubeconfig=kubeconfig)


@contextlib.asynccontextmanager
async def running_api(settings: ApiSettings, nats_url: str) -> AsyncIterator[Api]:
    async with serving(Api(settings, NatsSettings(url=nats_url))) as api:
        yield api


@dataclass
class ControlPlane:
    """Operator API + ingest + keys; bridges are started by the test."""

    tmp: Path
    nats_url: str
    pg_dsn: str
    api: Api
    ingest: Ingest
    private_key: Path
    public_key: Path
    token: str = TOKEN
    kubeconfig: Path | None = None
    http: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.AsyncClient(base_url=self.api.url, timeout=10,
                                      headers={"Authorization": f"Bearer {self.token}"})

    def bridge_settings(self, edge: str = "edge-1", *, port: int = 0, **control: Any
                        ) -> BridgeSettings:
        """A bridge that trusts this plane's key; ``control`` overrides ControlSettings."""
        fields: dict[str, Any] = {
            "public_key_file": self.public_key, "kubeconfig": self.kubeconfig,
            "allowed_namespaces": ["prod"], "ack_wait_s": 2.0,
        }
        fields.update(control)
        # Frequent heartbeats: the cloud learns of the edge (and accepts commands to it) fast.
        return bridge_settings(self.tmp, edge, port=port, heartbeat_interval_s=0.1,
                               control=ControlSettings(**fields))

    async def open_tails(self, stack: contextlib.AsyncExitStack, count: int
                         ) -> list[AsyncIterator[bytes]]:
        """``count`` live tails, each past its first event (open until ``stack``
        closes); their readers are returned to be kept: a dropped one closes its tail."""
        readers = []
        for _ in range(count):
            resp = await stack.enter_async_context(
                self.http.stream("GET", "/v1/records/tail", timeout=15))
            assert resp.status_code == 200
            readers.append(resp.aiter_bytes())
            assert (await anext(readers[-1])).startswith(b"retry:")
        return readers

    async def wait_edge(self, edge: str, timeout: float = 15) -> None:
        """Until the cloud has seen a heartbeat of ``edge`` (commands to it are accepted)."""
        async def known() -> bool:
            edges = (await self.http.get("/v1/edges")).json()
            return any(e["edge"] == edge for e in edges)
        await until(known, timeout=timeout, interval=0.05, message=f"edge {edge} never seen")

    async def issue(self, edge: str, kind: str, spec: dict[str, Any], **extra: Any) -> str:
        response = await self.http.post(f"/v1/edges/{edge}/commands",
                                        json={"kind": kind, "spec": spec, **extra})
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    async def command(self, command_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/v1/commands/{command_id}")
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()
        return found

    async def wait_status(self, command_id: str, statuses: Iterable[str] = ("applied",),
                          timeout: float = 15) -> dict[str, Any]:
        """Until the command is in one of ``statuses``; returns it."""
        wanted = set(statuses)
        return await until_in(lambda: self.command(command_id), "status", wanted,
                              timeout=timeout, what=f"command never reached {sorted(wanted)}")

    def status_reports(self, status: str) -> float:
        """Status reports of ``status`` the ingest has processed (repeats included)."""
        value = self.ingest.metrics.registry.get_sample_value(
            "edgesync_command_status_reports_total", {"status": status, "effective": "true"})
        repeats = self.ingest.metrics.registry.get_sample_value(
            "edgesync_command_status_reports_total", {"status": status, "effective": "false"})
        return (value or 0.0) + (repeats or 0.0)

    async def cli(self, *args: str, state_dir: Path | None = None) -> CliResult:
        """Run ``edgesync cmd --api-url ... --token ... ARGS`` as its own process (this
        event loop keeps serving the API meanwhile; its logs stay out of the output)."""
        options = (["--state-dir", str(state_dir)] if state_dir is not None
                   else ["--api-url", self.api.url, "--token", self.token])
        return await run_cli("cmd", *options, *args)


@dataclass(frozen=True)
class CliResult:
    exit_code: int
    output: str
    stderr: str


async def run_cli(*args: str, timeout: float = 60, stdin: str | None = None) -> CliResult:
    """``edgesync ARGS`` in a child process (``stdin``: what it reads there)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    out, err = await asyncio.wait_for(
        proc.communicate(None if stdin is None else stdin.encode()), timeout)
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())


@contextlib.asynccontextmanager
async def control_plane(tmp_path: Path, nats_url: str, pg_dsn: str, *,
                        kubeconfig: Path | None = None, **api: Any
                        ) -> AsyncIterator[ControlPlane]:
    private_key, public_key = generate_key_pair(tmp_path / "keys")
    fields: dict[str, Any] = {
        "postgres_dsn": pg_dsn, "port": 0, "private_key_file": private_key,
        "operator_token": TOKEN, "expiry_interval_s": 0.2, "republish_interval_s": 0.5,
    }
    fields.update(api)
    async with (
        running_ingest(pg_dsn, nats_url, fetch_timeout_s=0.1) as ingest,
        running_api(ApiSettings(**fields), nats_url) as the_api,
    ):
        plane = ControlPlane(tmp=tmp_path, nats_url=nats_url, pg_dsn=pg_dsn, api=the_api,
                             ingest=ingest,
                             private_key=private_key, public_key=public_key,
                             kubeconfig=kubeconfig)
        try:
            yield plane
        finally:
            await plane.http.aclose()
