"""Desired state on the wire: the document an operator declares for an edge, the
signed message that carries it, and the per-field comparison both sides use.

A :class:`DesiredDocument` says what an edge should run, field by field; only
what it names is managed (every other field of the cluster and the bridge is
left alone)::

    {"bridge": {"compression": "zstd", "streams": {"telemetry": {"ttl_s": 86400}}},
     "deployments": {"shop/web": {"replicas": 3,
                                  "containers": {"web": {"image": "reg/shop/web:1.8",
                                                         "env": {"MODE": "fast"}}}}},
     "configmaps": {"shop/web-config": {"color": "blue"}}}

It is validated by the same pydantic specs as the imperative commands
(:mod:`broker.protocol.command_specs`): :meth:`DesiredDocument.commands` turns it
into the ``(kind, spec)`` pairs that would make a cluster match it, and each is
parsed by its command's model, so a document is valid exactly when its commands
are.

The cloud signs one :class:`DesiredStateSpec` per edge as the ``spec`` of a
:class:`~broker.protocol.commands.CommandEnvelope` of kind :data:`DESIRED_KIND`
and stores it as the edge's key in the desired-state bucket
(:meth:`broker.protocol.topology.Topology.desired_bucket`): a KV bucket keeps one
value per key, so the newest version replaces an older one still unread, and an
edge back after a week reads only the latest. ``revision`` (a cloud-wide
sequence) orders them: the edge never goes back to a lower revision than it has
applied, so a replayed old message changes nothing.

:func:`compare` is the one definition of drift: the fields whose observed value
differs from the desired one.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from broker.errors import InvalidInput
from broker.protocol.command_specs import (
    BridgeConfigure,
    ConfigKey,
    ContainerName,
    EnvFromSecret,
    EnvName,
    describe_validation_error,
    parse_spec,
)
from broker.protocol.commands import iso_time

__all__ = [
    "DESIRED_KIND",
    "DESIRED_STATUSES",
    "ContainerState",
    "DeploymentState",
    "DesiredDocument",
    "DesiredStateSpec",
    "Drift",
    "compare",
    "merge_documents",
    "parse_document",
    "restart_stamp",
    "split_target",
]

DESIRED_KIND: Final = "desired.state"
"""The envelope kind of a signed desired-state message."""

DESIRED_STATUSES: Final = ("applying", "healthy", "drifted", "failed", "rejected")
"""What an edge reports about its desired state: ``applying`` (changes in progress),
``healthy`` (matches, and every Deployment named completed its rollout), ``drifted``
(matched once, then something else changed a field), ``failed`` (could not apply, or
not healthy by the deadline) and ``rejected`` (its allow-lists refuse the document)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ContainerState(_Model):
    """One container's managed fields."""

    image: str | None = Field(None, pattern=r"^\S+$", min_length=1, max_length=1024)
    env: dict[EnvName, str | EnvFromSecret | None] = Field(
        default_factory=dict, max_length=256,
        description="Variable -> value, a Secret reference, or null: must be absent.")


class DeploymentState(_Model):
    """A Deployment's managed fields."""

    replicas: int | None = Field(None, ge=0, le=10_000)
    containers: dict[ContainerName, ContainerState] = Field(default_factory=dict)
    restarted_at: str | None = Field(
        None, description="Restarted no earlier than this (ISO 8601 UTC with milliseconds, "
        "...Z); a later restart also satisfies it.")


class DesiredDocument(_Model):
    """What one edge should run; only the fields named are managed."""

    bridge: BridgeConfigure | None = None
    deployments: dict[str, DeploymentState] = Field(
        default_factory=dict, description="'namespace/name' -> its managed fields.")
    configmaps: dict[str, dict[ConfigKey, str | None]] = Field(
        default_factory=dict, description="'namespace/name' -> key -> value (null: absent).")

    @model_validator(mode="after")
    def _valid_as_commands(self) -> DesiredDocument:
        self.commands()  # raises ValueError naming the offending field
        return self

    def commands(self) -> list[tuple[str, dict[str, Any]]]:
        """The commands that make a cluster match the whole document, each valid for its
        kind's spec model (the allow-lists of an edge are checked against these).

        Raises:
            ValueError: a target is not ``namespace/name`` or a spec is invalid.
        """
        out: list[tuple[str, dict[str, Any]]] = []
        if self.bridge is not None:
            out.append(("bridge.configure", self.bridge.model_dump(mode="json",
                                                                   exclude_unset=True)))
        for target, dep in self.deployments.items():
            where = _target_fields(target, f"deployments.{target}")
            if dep.replicas is not None:
                out.append(("deployment.scale", {**where, "replicas": dep.replicas}))
            for name, container in dep.containers.items():
                if container.image is not None:
                    out.append(("deployment.set_image",
                                {**where, "container": name, "image": container.image}))
                if container.env:
                    out.append(("deployment.set_env", {**where, "container": name, "env": {
                        k: v.as_kubernetes() if isinstance(v, EnvFromSecret) else v
                        for k, v in container.env.items()}}))
            if dep.restarted_at is not None:
                restart_stamp(dep.restarted_at)
                out.append(("deployment.restart", dict(where)))
        for target, data in self.configmaps.items():
            where = _target_fields(target, f"configmaps.{target}")
            if data:
                out.append(("configmap.patch", {**where, "data": dict(data)}))
        for kind, spec in out:
            try:
                parse_spec(kind, spec)
            except InvalidInput as exc:
                raise ValueError(f"{kind}: {exc}") from None
        return out


def restart_stamp(value: str) -> float:
    """The Unix time of a ``restarted_at`` value, which must be in the canonical form
    the restart annotation uses (:func:`~broker.protocol.commands.iso_time`).

    Raises:
        ValueError: not that form.
    """
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        ts = None
    if ts is None or iso_time(ts) != value:
        raise ValueError(f"restarted_at {value!r} is not ISO 8601 UTC with milliseconds, "
                         "e.g. 2026-11-30T12:00:00.000Z")
    return ts


def split_target(target: str) -> tuple[str, str]:
    """``namespace/name`` -> ``(namespace, name)``.

    Raises:
        ValueError: not exactly one slash.
    """
    namespace, sep, name = target.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise ValueError(f"{target!r} is not 'namespace/name'")
    return namespace, name


def _target_fields(target: str, where: str) -> dict[str, str]:
    try:
        namespace, name = split_target(target)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return {"namespace": namespace, "name": name}


def parse_document(raw: Any, *, where: str = "document") -> DesiredDocument:
    """Validate a desired-state document.

    Raises:
        InvalidInput: the message names each offending field.
    """
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"{where}: a desired-state document is a JSON object")
    try:
        return DesiredDocument.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInput(describe_validation_error(exc, prefix=where)) from exc


def merge_documents(base: Mapping[str, Any], override: Mapping[str, Any] | None
                    ) -> dict[str, Any]:
    """``override`` laid over ``base`` as a JSON merge patch (RFC 7386): objects merge key
    by key, anything else replaces, and ``null`` removes the key - so a per-edge override
    changes one field of a group's document and leaves the rest."""
    if override is None:
        return dict(base)
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_documents(merged[key], value)
        else:
            merged[key] = value
    return merged


class DesiredStateSpec(_Model):
    """The ``spec`` of a signed :data:`DESIRED_KIND` envelope."""

    revision: int = Field(ge=1, description="Cloud-wide order; a lower one never applies.")
    version_id: int = Field(ge=0, description="The desired version it resolves (0: none).")
    rollout_id: int | None = Field(None, ge=1)
    document: dict[str, Any]

    @model_validator(mode="after")
    def _document_valid(self) -> DesiredStateSpec:
        parse_document(self.document)
        return self


class Drift(_Model):
    """One field whose observed value is not the desired one."""

    path: str
    """``deployments.prod/web.replicas``, ``configmaps.prod/settings.data.color``, ..."""
    desired: Any
    observed: Any


def compare(document: DesiredDocument, observed: Mapping[str, Any]) -> list[Drift]:
    """The drift of ``observed`` from ``document``.

    Args:
        observed: what the edge sees, in the shape of the document's fields:
            ``{"bridge": <effective bridge config>, "deployments": {target: {"replicas",
            "containers": {name: {"image", "env": {VAR: value}}}, "restarted_at",
            "exists"}}, "configmaps": {target: {key: value} or None when absent}}``.
    """
    out: list[Drift] = []
    if document.bridge is not None:
        out.extend(_bridge_drift(document.bridge, observed.get("bridge") or {}))
    deployments = observed.get("deployments") or {}
    for target, dep in document.deployments.items():
        out.extend(_deployment_drift(f"deployments.{target}", dep, deployments.get(target)))
    configmaps = observed.get("configmaps") or {}
    for target, data in document.configmaps.items():
        have_data = configmaps.get(target)
        if have_data is None:
            out.append(_absent(f"configmaps.{target}"))
        else:
            out.extend(_differences(f"configmaps.{target}.data", data, have_data))
    return out


def _absent(path: str) -> Drift:
    return Drift(path=path, desired="present", observed=None)


def _differences(base: str, want: Mapping[str, Any], have: Mapping[str, Any]) -> list[Drift]:
    """A drift for every field of ``want`` whose value ``have`` does not hold."""
    return [Drift(path=f"{base}.{field}", desired=value, observed=have.get(field))
            for field, value in want.items() if value != have.get(field)]


def _specified(**fields: Any) -> dict[str, Any]:
    """The fields a document sets (None: not managed)."""
    return {name: value for name, value in fields.items() if value is not None}


def _deployment_drift(base: str, dep: DeploymentState, seen: Mapping[str, Any] | None,
                      ) -> list[Drift]:
    if not seen or not seen.get("exists", True):
        return [_absent(base)]
    out = _differences(base, _specified(replicas=dep.replicas), seen)
    containers = seen.get("containers") or {}
    for name, container in dep.containers.items():
        have = containers.get(name)
        cbase = f"{base}.containers.{name}"
        if have is None:
            out.append(_absent(cbase))
            continue
        out.extend(_differences(cbase, _specified(image=container.image), have))
        env = {var: value.as_kubernetes() if isinstance(value, EnvFromSecret) else value
               for var, value in container.env.items()}
        out.extend(_differences(f"{cbase}.env", env, have.get("env") or {}))
    if dep.restarted_at is not None:
        stamp = seen.get("restarted_at")
        if not isinstance(stamp, str) or stamp < dep.restarted_at:
            out.append(Drift(path=f"{base}.restarted_at", desired=dep.restarted_at,
                             observed=stamp))
    return out


_POLICY_FIELDS: Final = ("overflow", "priority", "ttl_s")


def _bridge_drift(bridge: BridgeConfigure, effective: Mapping[str, Any]) -> list[Drift]:
    out: list[Drift] = []
    for field in sorted(bridge.model_fields_set - {"default_policy", "streams"}):
        want, have = getattr(bridge, field), effective.get(field)
        if want != have:
            out.append(Drift(path=f"bridge.{field}", desired=want, observed=have))
    if bridge.default_policy is not None:
        have_default = effective.get("default_policy") or {}
        for field in sorted(bridge.default_policy.model_fields_set & set(_POLICY_FIELDS)):
            want = getattr(bridge.default_policy, field)
            if want != have_default.get(field):
                out.append(Drift(path=f"bridge.default_policy.{field}", desired=want,
                                 observed=have_default.get(field)))
    streams = effective.get("streams") or {}
    for name, change in (bridge.streams or {}).items():
        have_policy = streams.get(name)
        if change is None:
            if have_policy is not None:
                out.append(Drift(path=f"bridge.streams.{name}", desired=None,
                                 observed=have_policy))
            continue
        for field in sorted(change.model_fields_set & set(_POLICY_FIELDS)):
            want = getattr(change, field)
            have = None if have_policy is None else have_policy.get(field)
            if have_policy is None or want != have:
                out.append(Drift(path=f"bridge.streams.{name}.{field}", desired=want,
                                 observed=have))
    return out
