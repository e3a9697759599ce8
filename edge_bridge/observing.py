"""What the edge observes of the fields a desired-state document manages, and whether a
Deployment is healthy: the reconciler's eyes (:mod:`edge_bridge.desired_state`).

Pure functions over Kubernetes objects as JSON (unit-tested without a cluster),
plus :func:`observe`, which reads the objects a document names through the
applier's client. The observed shape mirrors the document
(:func:`broker.protocol.desired.compare` defines drift over it).

Health is what ``kubectl rollout status`` waits for: the controller has seen the
newest spec (``observedGeneration >= generation``), every replica runs the new
template (``updatedReplicas``), is available (``availableReplicas``), and no old
replica is left (``status.replicas == updatedReplicas``).
"""

from __future__ import annotations

from typing import Any

from broker.errors import ApplyFailed
from broker.protocol.desired import DesiredDocument, split_target
from edge_bridge.applying import RESTARTED_AT_ANNOTATION, KubernetesApplier

__all__ = ["deployment_fields", "deployment_health", "observe"]


def deployment_fields(deployment: dict[str, Any] | None) -> dict[str, Any]:
    """The managed fields of a Deployment as the document names them."""
    if deployment is None:
        return {"exists": False}
    spec = deployment.get("spec") or {}
    template = spec.get("template") or {}
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    containers: dict[str, Any] = {}
    for container in (template.get("spec") or {}).get("containers") or []:
        env: dict[str, Any] = {}
        for item in container.get("env") or []:  # duplicates are legal: the last wins
            name = str(item.get("name"))
            env[name] = (item["value"] if "value" in item
                         else {k: v for k, v in item.items() if k != "name"} or "")
        containers[str(container.get("name"))] = {"image": container.get("image"), "env": env}
    return {"exists": True, "replicas": spec.get("replicas"), "containers": containers,
            "restarted_at": annotations.get(RESTARTED_AT_ANNOTATION)}


def deployment_health(deployment: dict[str, Any] | None) -> str | None:
    """None when the Deployment's rollout is complete; else why not, in words."""
    if deployment is None:
        return "does not exist"
    meta = deployment.get("metadata") or {}
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    wanted = int(spec.get("replicas", 1) if spec.get("replicas") is not None else 1)
    generation = meta.get("generation")
    if generation is not None and int(status.get("observedGeneration") or 0) < int(generation):
        return "the controller has not yet seen the newest spec"
    updated = int(status.get("updatedReplicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    total = int(status.get("replicas") or 0)
    if updated < wanted:
        return f"{updated} of {wanted} replicas updated"
    if total > updated:
        return f"{total - updated} old replicas pending termination"
    if available < wanted:
        return f"{available} of {wanted} updated replicas available"
    return None


async def observe(document: DesiredDocument, kube: KubernetesApplier | None,
                  bridge: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Read what ``document`` manages.

    Returns:
        The observed fields (shape of :func:`broker.protocol.desired.compare`'s
        ``observed``) and the raw Deployments read, by ``namespace/name``.

    Raises:
        ApplyFailed: Kubernetes is not configured but the document names objects, or
            the API refused a read.
        TemporaryError: the API is unreachable.
    """
    observed: dict[str, Any] = {"bridge": bridge, "deployments": {}, "configmaps": {}}
    raw: dict[str, dict[str, Any]] = {}
    if (document.deployments or document.configmaps) and kube is None:
        raise ApplyFailed("the desired state names Kubernetes objects, but Kubernetes is "
                          "not configured on this edge")
    for target in document.deployments:
        assert kube is not None
        namespace, name = split_target(target)
        found = await kube.read("deployment", namespace, name)
        observed["deployments"][target] = deployment_fields(found)
        if found is not None:
            raw[target] = found
    for target in document.configmaps:
        assert kube is not None
        namespace, name = split_target(target)
        found = await kube.read("configmap", namespace, name)
        observed["configmaps"][target] = (None if found is None
                                          else dict(found.get("data") or {}))
    return observed, raw
