"""What each command kind's ``spec`` may contain: one pydantic model per kind.

The cloud API validates a request against these models before it signs
anything (a bad spec is a 422, never a command), and the bridge validates the
signed spec again before acting, so an edge never trusts a spec it cannot
parse. Every model forbids unknown fields: a typo is an error, not a no-op.

| kind                    | spec                                                    |
| ----------------------- | ------------------------------------------------------- |
| ``deployment.scale``    | ``namespace, name, replicas``                           |
| ``deployment.set_env``  | ``namespace, name, container?, env: {K: V or null}``    |
| ``deployment.set_image``| ``namespace, name, container, image``                   |
| ``deployment.restart``  | ``namespace, name``                                     |
| ``configmap.patch``     | ``namespace, name, data: {K: V or null}``               |
| ``bridge.configure``    | batch size, linger, compression, stream policies, ...   |
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from broker.errors import InvalidInput
from broker.protocol.tokens import TOKEN_PATTERN
from broker.settings import StreamPolicy

__all__ = [
    "KINDS",
    "KUBERNETES_KINDS",
    "MASK",
    "SPEC_MODELS",
    "BridgeConfigure",
    "ConfigKey",
    "ConfigMapPatch",
    "ContainerName",
    "DeploymentRestart",
    "DeploymentScale",
    "DeploymentSetEnv",
    "DeploymentSetImage",
    "EnvFromSecret",
    "EnvName",
    "EnvValueFrom",
    "KubernetesTarget",
    "Namespace",
    "ObjectName",
    "SecretKeyRef",
    "StreamPolicyChange",
    "describe_validation_error",
    "image_repository",
    "masked_spec",
    "parse_spec",
]

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

Namespace = Annotated[str, Field(pattern=_DNS_LABEL, max_length=63,
                                 description="Kubernetes namespace (a DNS-1123 label).")]
ObjectName = Annotated[str, Field(pattern=_DNS_SUBDOMAIN, max_length=253,
                                  description="Object name (a DNS-1123 subdomain).")]
ContainerName = Annotated[str, Field(pattern=_DNS_LABEL, max_length=63,
                                     description="Container name in the pod template.")]
EnvName = Annotated[str, Field(pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=256)]
ConfigKey = Annotated[str, Field(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)]


class _Spec(BaseModel):
    # strict: `"replicas": "3"` or `false` is refused, never coerced (an operator's typo
    # must not become a command).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class KubernetesTarget(_Spec):
    """The object a Kubernetes command acts on."""

    namespace: Namespace
    name: ObjectName

    @property
    def target(self) -> str:
        """``namespace/name``, the form the allow-list matches."""
        return f"{self.namespace}/{self.name}"


class DeploymentScale(KubernetesTarget):
    """Set a Deployment's replica count."""

    replicas: int = Field(ge=0, le=10_000, description="Desired replicas.")


class SecretKeyRef(_Spec):
    """One key of a Secret in the Deployment's namespace."""

    name: ObjectName
    key: ConfigKey


class EnvValueFrom(_Spec):
    secretKeyRef: SecretKeyRef


class EnvFromSecret(_Spec):
    """``{"valueFrom": {"secretKeyRef": {"name": ..., "key": ...}}}``: the value stays in
    the edge cluster's Secret; the command (and everything that stores it) carries only
    its name."""

    valueFrom: EnvValueFrom

    def as_kubernetes(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


MASK: Final = "***"
"""What a plain-text env value is shown as in API answers and logs."""


class DeploymentSetEnv(KubernetesTarget):
    """Set or remove environment variables; every other variable and field is kept.
    Prefer a Secret reference for anything sensitive: plain values travel in the
    command and are stored by the cloud (masked in its answers)."""

    container: ContainerName | None = Field(
        None, description="Only this container; omitted: every container (as `kubectl set env`)."
    )
    env: dict[EnvName, str | EnvFromSecret | None] = Field(
        min_length=1, max_length=256, description="Variable -> plain value, a Secret "
        "reference ({valueFrom: {secretKeyRef: {name, key}}}), or null to remove it.",
    )


def image_repository(image: str) -> str:
    """The ``registry/path`` an image reference pulls from, normalised as Docker does
    (``nginx:1.25`` is ``docker.io/library/nginx``): what a registry allow-list matches."""
    name = image.split("@", 1)[0]
    if name.rfind(":") > name.rfind("/"):
        name = name[: name.rfind(":")]
    first, _, rest = name.partition("/")
    if not rest:
        return f"docker.io/library/{first}"
    if "." in first or ":" in first or first == "localhost":
        return name
    return f"docker.io/{name}"


def masked_spec(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` as it may be shown: plain-text env values of ``deployment.set_env``
    replaced by :data:`MASK` (Secret references and removals stay readable)."""
    env = spec.get("env")
    if kind != "deployment.set_env" or not isinstance(env, dict):
        return spec
    return {**spec, "env": {k: MASK if isinstance(v, str) else v for k, v in env.items()}}


class DeploymentSetImage(KubernetesTarget):
    """Roll a container to a new image (from a registry the edge allows)."""

    container: ContainerName
    image: str = Field(pattern=r"^\S+$", min_length=1, max_length=1024,
                       description="Image reference, e.g. registry/app:1.2.3 or @sha256:...")


class DeploymentRestart(KubernetesTarget):
    """Restart a Deployment's pods as ``kubectl rollout restart`` does."""


class ConfigMapPatch(KubernetesTarget):
    """Set or remove ConfigMap keys; other keys are kept."""

    data: dict[ConfigKey, str | None] = Field(
        min_length=1, max_length=1024, description="Key -> value; null removes the key."
    )


class StreamPolicyChange(_Spec):
    """A partial stream policy: only the fields given change."""

    overflow: Literal["block", "drop_oldest"] | None = None
    priority: int | None = Field(None, ge=-1000, le=1000)
    ttl_s: float | None = Field(None, gt=0, description="null removes the TTL.")

    def merged_into(self, policy: StreamPolicy) -> StreamPolicy:
        """``policy`` with the fields this change sets (an explicit null TTL clears it)."""
        update = {k: getattr(self, k) for k in self.model_fields_set}
        if update.get("overflow") is None:
            update.pop("overflow", None)
        if update.get("priority") is None:
            update.pop("priority", None)
        return StreamPolicy.model_validate({**policy.model_dump(), **update})


class BridgeConfigure(_Spec):
    """Tune a running bridge. Applied live, persisted in its buffer directory so it
    survives a restart; only the fields given change."""

    batch_max_records: int | None = Field(None, ge=1, le=100_000, description="Records/batch.")
    batch_max_bytes: int | None = Field(
        None, ge=1024, le=1024 * 1024,
        description="Payload bytes per batch; capped at NATS' default 1 MiB max_payload, "
        "above which every publish would fail.",
    )
    linger_ms: float | None = Field(None, ge=0, le=10_000, description="Milliseconds.")
    compression: Literal["none", "zstd"] | None = None
    zstd_level: int | None = Field(None, ge=1, le=19)
    default_policy: StreamPolicyChange | None = Field(
        None, description="Changes to the policy of streams without their own."
    )
    streams: dict[Annotated[str, Field(pattern=f"^{TOKEN_PATTERN}$")],
                  StreamPolicyChange | None] | None = Field(
        None, description="Per-stream policy changes; null removes a stream's own policy."
    )
    log_level: Literal["debug", "info", "warning", "error"] | None = None
    heartbeat_interval_s: float | None = Field(None, gt=0, le=3600, description="Seconds.")

    @model_validator(mode="after")
    def _changes_something(self) -> BridgeConfigure:
        if not self.model_fields_set:
            raise ValueError("bridge.configure needs at least one setting to change")
        return self


SPEC_MODELS: Final[dict[str, type[_Spec]]] = {
    "deployment.scale": DeploymentScale,
    "deployment.set_env": DeploymentSetEnv,
    "deployment.set_image": DeploymentSetImage,
    "deployment.restart": DeploymentRestart,
    "configmap.patch": ConfigMapPatch,
    "bridge.configure": BridgeConfigure,
}
KINDS: Final = tuple(SPEC_MODELS)
KUBERNETES_KINDS: Final = tuple(k for k in KINDS if not k.startswith("bridge."))


def describe_validation_error(
    errors: ValidationError | Iterable[Mapping[str, Any]], *, prefix: str = ""
) -> str:
    """One readable line per problem: ``spec.replicas: Input should be ...``.

    Args:
        errors: a pydantic ``ValidationError``, or its ``errors()`` list (what
            FastAPI's ``RequestValidationError.errors()`` gives); the leading
            ``body`` FastAPI puts in front of a request body's locations is left out.
        prefix: a location to put in front of every problem's own.
    """
    items = errors.errors() if isinstance(errors, ValidationError) else errors
    parts = []
    for err in items:
        if err.get("type") == "json_invalid":  # FastAPI's: the reason is in its ctx
            reason = (err.get("ctx") or {}).get("error") or err.get("msg")
            parts.append(f"the body is not JSON: {reason}")
            continue
        where = tuple(err.get("loc", ()))
        if where[:1] == ("body",):
            where = where[1:]
        loc = ".".join(str(p) for p in (prefix, *where) if p != "")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


def parse_spec(kind: str, spec: Any) -> BaseModel:
    """Validate ``spec`` for ``kind``.

    Raises:
        InvalidInput: unknown kind, or the spec does not fit its model (message names
            each offending field).
    """
    model = SPEC_MODELS.get(kind)
    if model is None:
        raise InvalidInput(f"unknown command kind {kind!r}; known: {', '.join(KINDS)}")
    try:
        return model.model_validate(spec)
    except ValidationError as exc:
        raise InvalidInput(describe_validation_error(exc, prefix="spec")) from exc
