"""Carrying out an admitted control command: Kubernetes and the bridge itself.

Commands reach here only through the gate (:mod:`edge_bridge.admission`).
:class:`KubernetesApplier` acts through the official ``kubernetes``
client (imported on first use, so a bridge without Kubernetes commands never
pays for it). Every write is *precise*, with the same meaning on a real API
server and on a plain-JSON-merge emulator:

- dict-only merge patches (``application/merge-patch+json``) where no list is
  involved: replicas, the restart annotation, ConfigMap data;
- JSON Patch (``application/json-patch+json``) with explicit list indices for
  env vars and images, computed from a fresh read and pinned to that read's
  ``resourceVersion`` (a stale index becomes a 409 Conflict, never a wrong write).

409 Conflicts are retried (a fresh read each time) a bounded number of times;
404/403/422 and the rest become ``failed`` with the API's own message; an
unreachable API is retried until ``apply_timeout_s`` or the command's expiry.
Every kind is a "make it so" operation, so applying the same command again
after a crash mid-apply converges to the same state (the restart annotation is
the command's issue time, not the apply time, for exactly that reason).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from pydantic import BaseModel

from broker.backoff import backoff_s
from broker.errors import ApplyFailed, InvalidInput, TemporaryError
from broker.protocol.command_specs import (
    BridgeConfigure,
    ConfigMapPatch,
    DeploymentRestart,
    DeploymentScale,
    DeploymentSetEnv,
    DeploymentSetImage,
    EnvFromSecret,
)
from broker.protocol.commands import CommandEnvelope, iso_time
from broker.settings import ControlSettings

__all__ = [
    "RESTARTED_AT_ANNOTATION",
    "Appliers",
    "KubernetesApplier",
    "set_env_patch",
    "set_image_patch",
]

log = structlog.get_logger(__name__)

RESTARTED_AT_ANNOTATION = "kubectl.kubernetes.io/restartedAt"
_MERGE = "application/merge-patch+json"
_JSON_PATCH = "application/json-patch+json"
_FIELD_MANAGER = "edgesync"


class _Conflict(Exception):
    """A 409 from the API server: re-read and try again."""


class _Missing(ApplyFailed):
    """A 404: fails a command; to an observer, the object is simply absent."""


# -- precise patches (pure, unit-tested) ------------------------------------------------


def _containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    spec = deployment.get("spec") or {}
    template = spec.get("template") or {}
    return list((template.get("spec") or {}).get("containers") or [])


def _container_index(deployment: dict[str, Any], container: str) -> int:
    names = [c.get("name") for c in _containers(deployment)]
    if container not in names:
        raise ApplyFailed(f"container {container!r} not found (containers: "
                          f"{', '.join(str(n) for n in names) or 'none'})")
    return names.index(container)


def _pin(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    """A JSON Patch op that makes the write conditional on the version it was computed from."""
    version = (deployment.get("metadata") or {}).get("resourceVersion")
    if not version:
        return []
    return [{"op": "add", "path": "/metadata/resourceVersion", "value": version}]


def set_env_patch(deployment: dict[str, Any], container: str | None,
                  env: Mapping[str, str | EnvFromSecret | None]
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """JSON Patch ops that set/remove ``env`` in one or every container, touching
    nothing else; and a summary. No ops when nothing would change.

    Raises:
        ApplyFailed: the named container does not exist.
    """
    containers = _containers(deployment)
    indices = ([_container_index(deployment, container)] if container is not None
               else list(range(len(containers))))
    if not indices:
        raise ApplyFailed("deployment has no containers")
    ops: list[dict[str, Any]] = []
    changed: set[str] = set()
    for i in indices:
        base = f"/spec/template/spec/containers/{i}/env"
        current = containers[i].get("env")
        items: list[dict[str, Any]] = list(current or [])
        where: dict[str, list[int]] = {}
        for j, item in enumerate(items):
            where.setdefault(str(item.get("name")), []).append(j)
        replaces: list[dict[str, Any]] = []
        removes: list[int] = []
        adds: list[dict[str, Any]] = []
        for name, value in env.items():
            found = where.get(name, [])
            if value is None:
                removes.extend(found)
                continue
            wanted: dict[str, Any] = (
                {"name": name, "value": value} if isinstance(value, str)
                else {"name": name, **value.as_kubernetes()})  # from the edge's Secret
            if not found:
                adds.append(wanted)
                continue
            # Duplicates are legal (the last wins): keep one, the last, set to the value.
            *earlier, last = found
            removes.extend(earlier)
            if items[last] != wanted:
                replaces.append({"op": "replace", "path": f"{base}/{last}", "value": wanted})
        # Replacements first (no index moves), then removals from the highest index
        # down (each only shifts indices already handled), then appends.
        container_ops = replaces + [
            {"op": "remove", "path": f"{base}/{j}"} for j in sorted(set(removes), reverse=True)
        ]
        if adds and current is None:
            container_ops.append({"op": "add", "path": base, "value": adds})
        else:
            container_ops.extend({"op": "add", "path": f"{base}/-", "value": a} for a in adds)
        if container_ops:
            changed.add(str(containers[i].get("name")))
        ops.extend(container_ops)
    summary = {
        "containers": sorted(changed),
        "set": sorted(k for k, v in env.items() if v is not None),
        "removed": sorted(k for k, v in env.items() if v is None),
        "changed": bool(ops),
    }
    return (_pin(deployment) + ops if ops else []), summary


def set_image_patch(deployment: dict[str, Any], container: str, image: str
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """JSON Patch ops that change one container's image only; and a summary.

    Raises:
        ApplyFailed: the container does not exist.
    """
    i = _container_index(deployment, container)
    previous = _containers(deployment)[i].get("image")
    summary = {"container": container, "image": image, "previous_image": previous,
               "changed": previous != image}
    if previous == image:
        return [], summary
    op = {"op": "replace" if previous is not None else "add",
          "path": f"/spec/template/spec/containers/{i}/image", "value": image}
    return [*_pin(deployment), op], summary


# -- Kubernetes ------------------------------------------------------------------------


class KubernetesApplier:
    """Applies Kubernetes command kinds through the official client (imported lazily)."""

    def __init__(self, settings: ControlSettings,
                 on_conflict: Callable[[], None] | None = None) -> None:
        self._settings = settings
        self._on_conflict = on_conflict
        self._client: Any = None
        self._apps: Any = None
        self._core: Any = None
        self._api_exception: type[Exception] | None = None
        self._transport_errors: tuple[type[BaseException], ...] = (OSError,)

    def _connect(self) -> None:
        """Import the client and load the configuration (runs in a worker thread)."""
        try:
            import kubernetes
            import urllib3
        except ImportError as exc:  # pragma: no cover - the extra is installed in tests
            raise ApplyFailed(
                "kubernetes client not installed (in the source tree: pip install '.[kubernetes]')"
            ) from exc
        try:
            if self._settings.kubeconfig is not None:
                client = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
                    config_file=str(self._settings.kubeconfig),
                    context=self._settings.kube_context, persist_config=False,
                )
            else:
                configuration = kubernetes.client.Configuration()
                kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
                    client_configuration=configuration)
                client = kubernetes.client.ApiClient(configuration)
        except (kubernetes.config.ConfigException, OSError, ValueError) as exc:
            raise ApplyFailed(f"cannot load Kubernetes configuration: {exc}") from exc
        self._api_exception = kubernetes.client.ApiException
        self._transport_errors = (OSError, urllib3.exceptions.HTTPError)
        self._apps = kubernetes.client.AppsV1Api(client)
        self._core = kubernetes.client.CoreV1Api(client)
        self._client = client

    def close(self) -> None:
        """Release the client's connection pool; idempotent."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def apply(self, spec: BaseModel, envelope: CommandEnvelope, *, deadline: float
                    ) -> dict[str, Any]:
        """Carry out one Kubernetes command; returns what it achieved.

        Raises:
            ApplyFailed: with the API server's message (404, 403, 422, conflicts
                beyond the retry budget, or unreachable until ``deadline``).
        """
        if self._client is None:
            await asyncio.to_thread(self._connect)
        attempt = 0
        conflicts = 0
        while True:
            try:
                return await self._apply_once(spec, envelope)
            except _Conflict as exc:
                conflicts += 1
                if self._on_conflict is not None:
                    self._on_conflict()
                if conflicts > self._settings.conflict_retries:
                    raise ApplyFailed(f"conflict persisted after {conflicts} attempts: {exc}"
                                      ) from None
                log.info("kubernetes_conflict_retried", command=envelope.id, attempt=conflicts)
                await asyncio.sleep(backoff_s(conflicts, base_s=0.05, cap_s=1.6))
            except TemporaryError as exc:
                attempt += 1
                delay = backoff_s(attempt, base_s=0.2)
                if time.time() + delay >= deadline:
                    raise ApplyFailed(f"Kubernetes API unavailable: {exc}") from None
                log.warning("kubernetes_unavailable", command=envelope.id, attempt=attempt,
                            retry_in_s=round(delay, 2), error=str(exc))
                await asyncio.sleep(delay)

    async def connect(self) -> None:
        """Import and configure the client now rather than on the first command (the
        import alone takes seconds on a small edge); idempotent.

        Raises:
            ApplyFailed: the client is missing or the configuration unusable.
        """
        if self._client is None:
            await asyncio.to_thread(self._connect)

    async def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The current object (``kind`` is ``deployment`` or ``configmap``), or None when
        it does not exist. What the desired-state reconciler observes.

        Raises:
            ApplyFailed: the API refused the read (403, ...).
            TemporaryError: the API is unreachable or overloaded.
        """
        if self._client is None:
            await asyncio.to_thread(self._connect)
        method = (self._apps.read_namespaced_deployment if kind == "deployment"
                  else self._core.read_namespaced_config_map)
        try:
            return await self._call(method, name, namespace)
        except _Missing:
            return None
        except _Conflict as exc:  # not on a read; keep the type ours
            raise TemporaryError(str(exc)) from exc

    async def _apply_once(self, spec: BaseModel, env: CommandEnvelope) -> dict[str, Any]:
        if isinstance(spec, DeploymentScale):
            current = await self._call(self._apps.read_namespaced_deployment,
                                       spec.name, spec.namespace)
            previous = (current.get("spec") or {}).get("replicas")
            await self._call(self._apps.patch_namespaced_deployment, spec.name, spec.namespace,
                             {"spec": {"replicas": spec.replicas}}, content_type=_MERGE)
            return {"replicas": spec.replicas, "previous_replicas": previous}
        if isinstance(spec, DeploymentSetEnv | DeploymentSetImage):
            current = await self._call(self._apps.read_namespaced_deployment,
                                       spec.name, spec.namespace)
            ops, summary = (
                set_env_patch(current, spec.container, spec.env)
                if isinstance(spec, DeploymentSetEnv)
                else set_image_patch(current, spec.container, spec.image)
            )
            if ops:  # JSON Patch by index: every other env var, container and the image stay
                await self._call(self._apps.patch_namespaced_deployment, spec.name,
                                 spec.namespace, ops, content_type=_JSON_PATCH)
            return summary
        if isinstance(spec, DeploymentRestart):
            # The command's issue time, not "now": re-applying after a crash writes the
            # same value and so does not start a second rollout.
            stamp = iso_time(env.issued_at)
            patch = {"spec": {"template": {"metadata": {"annotations": {
                RESTARTED_AT_ANNOTATION: stamp}}}}}
            await self._call(self._apps.patch_namespaced_deployment, spec.name, spec.namespace,
                             patch, content_type=_MERGE)
            return {"restarted_at": stamp}
        if isinstance(spec, ConfigMapPatch):
            await self._call(self._core.patch_namespaced_config_map, spec.name, spec.namespace,
                             {"data": dict(spec.data)}, content_type=_MERGE)
            return {"set": sorted(k for k, v in spec.data.items() if v is not None),
                    "removed": sorted(k for k, v in spec.data.items() if v is None)}
        raise ApplyFailed(f"{env.kind} is not a Kubernetes command")  # pragma: no cover

    async def _call(self, method: Callable[..., Any], name: str, namespace: str,
                    body: Any = None, *, content_type: str | None = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"_preload_content": False,
                                  "_request_timeout": self._settings.kube_timeout_s}
        args: tuple[Any, ...] = (name, namespace)
        if body is not None:
            args += (body,)
            kwargs["_content_type"] = content_type
            kwargs["field_manager"] = _FIELD_MANAGER
        try:
            response = await asyncio.to_thread(method, *args, **kwargs)
        except Exception as exc:
            raise self._translate(exc) from exc
        data = json.loads(response.data or b"{}")
        return data if isinstance(data, dict) else {}

    def _translate(self, exc: Exception) -> Exception:
        if self._api_exception is not None and isinstance(exc, self._api_exception):
            status = int(getattr(exc, "status", 0) or 0)
            message = _api_message(exc)
            if status == 409:
                return _Conflict(message)
            if status == 429 or status >= 500:
                return TemporaryError(f"HTTP {status}: {message}")
            if status == 404:
                return _Missing(f"HTTP {status}: {message}")
            return ApplyFailed(f"HTTP {status}: {message}")
        if isinstance(exc, self._transport_errors):
            return TemporaryError(f"{type(exc).__name__}: {exc}")
        return exc


def _api_message(exc: Exception) -> str:
    """The Status ``message`` of a Kubernetes API error, else its reason."""
    body = getattr(exc, "body", None)
    if body:
        try:
            status = json.loads(body)
        except (ValueError, TypeError):
            status = None
        if isinstance(status, dict) and status.get("message"):
            return str(status["message"])
    return str(getattr(exc, "reason", None) or exc)


# -- dispatch --------------------------------------------------------------------------


class Appliers:
    """Routes an admitted command to what carries it out."""

    def __init__(
        self,
        *,
        configure: Callable[[BridgeConfigure], Awaitable[dict[str, Any]]],
        kubernetes: KubernetesApplier | None,
    ) -> None:
        self._configure = configure
        self.kubernetes = kubernetes

    async def apply(self, spec: BaseModel, envelope: CommandEnvelope, *, deadline: float
                    ) -> dict[str, Any]:
        """Returns the result to report with ``applied``.

        Raises:
            ApplyFailed: reported ``failed`` with the message.
        """
        if isinstance(spec, BridgeConfigure):
            try:
                return await self._configure(spec)
            except (InvalidInput, OSError) as exc:
                raise ApplyFailed(f"cannot configure the bridge: {exc}") from exc
        if self.kubernetes is None:
            raise ApplyFailed("Kubernetes commands are not configured on this edge")
        return await self.kubernetes.apply(spec, envelope, deadline=deadline)

    def close(self) -> None:
        if self.kubernetes is not None:
            self.kubernetes.close()
