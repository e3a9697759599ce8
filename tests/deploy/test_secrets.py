"""The Secrets the manifests reference are the Secrets deploy/secrets/generate.py
writes: same names, same keys, in the right namespaces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.rendering import DEPLOY, OVERLAYS, ROOT, containers, pod_spec, render, renderer

# Not ours to generate: CloudNativePG writes the database's, cert-manager (or the
# operator, by hand) the Ingress certificate.
EXTERNAL = {"edgesync-pg-app", "edgesync-api-tls"}


def _references(docs: list[dict[str, Any]]) -> set[tuple[str, str, str | None]]:
    """(namespace, secret, key or None for a whole-Secret mount) the objects use."""
    found: set[tuple[str, str, str | None]] = set()
    for doc in docs:
        namespace = doc["metadata"].get("namespace", "")
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for volume in pod_spec(doc).get("volumes", []):
                if "secret" in volume:
                    found.add((namespace, volume["secret"]["secretName"], None))
            for container in containers(doc):
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        found.add((namespace, ref["name"], ref["key"]))
        if doc["kind"] == "Ingress":
            found |= {(namespace, t["secretName"], None) for t in doc["spec"]["tls"]}
        if doc["kind"] == "ServiceMonitor":
            for endpoint in doc["spec"]["endpoints"]:
                creds = endpoint.get("authorization", {}).get("credentials")
                if creds:
                    found.add((namespace, creds["name"], creds["key"]))
    return found


def test_generated_secrets_cover_every_reference(tmp_path: Path) -> None:
    """Rendered from the generator's output for two sites, the Secrets validate and
    include every Secret and key the cloud and edge overlays use."""
    command = renderer()
    if command is None:
        pytest.skip("neither kubectl nor kustomize is on PATH")
    out = tmp_path / "secrets"
    subprocess.run([sys.executable, str(DEPLOY / "secrets" / "generate.py"), "--out", str(out),
                    "--nats-host", "nats.example.com", "site-001", "site-002"],
                   check=True, capture_output=True, cwd=ROOT, timeout=60)
    generated: dict[tuple[str, str], set[str]] = {}
    for directory in (out / "cloud", out / "edges" / "site-001"):
        done = subprocess.run([*command, str(directory)], capture_output=True, text=True,
                              check=True, timeout=60)
        for doc in yaml.safe_load_all(done.stdout):
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(),
                                         strict=True)
            key = (doc["metadata"]["namespace"], doc["metadata"]["name"])
            generated[key] = set(doc["data"])
    for overlay in OVERLAYS:
        for namespace, name, key in _references(render(overlay)):
            if name in EXTERNAL:
                continue
            assert (namespace, name) in generated, (overlay, namespace, name)
            assert key is None or key in generated[namespace, name], (overlay, name, key)
    for path in out.rglob("*"):
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
