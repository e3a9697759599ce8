"""The admission gate: whether a control command may act on this edge.

:class:`CommandGate` is the edge's gatekeeper, checked in this order:

1. :meth:`CommandGate.open` - signature by a trusted key, canonical form, and
   that the command is addressed to *this* edge. Anything failing here is not
   authentic (or not ours) and is never remembered as a command.
2. (the consumer checks its durable memory of ids here: replays stop.)
3. :meth:`CommandGate.admit` - not expired, not issued in the future beyond
   the allowed clock skew, a lifetime within this edge's ``max_ttl_s``, not
   issued before this edge's control store was created (its memory of applied
   ids: a command older than that memory could be a replay after a lost volume;
   the same clock-skew allowance applies),
   a kind this edge allows, a valid spec, a target inside the local allow-list
   (namespaces, deployments, configmaps), and for ``set_image`` an allowed registry.

Every refusal is a :class:`~broker.errors.CommandRejected` with a stable code;
nothing here acts. Acting is :mod:`edge_bridge.applying`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel

from broker.errors import CommandRejected, InvalidInput
from broker.protocol.command_specs import (
    KINDS,
    ConfigMapPatch,
    DeploymentSetImage,
    KubernetesTarget,
    image_repository,
    parse_spec,
)
from broker.protocol.commands import OpenedCommand, iso_time, open_command
from broker.settings import ControlSettings

__all__ = ["CommandGate"]


class CommandGate:
    """Signature, addressing, expiry, kind, spec and allow-list checks of one edge."""

    def __init__(self, *, edge_id: str, trusted_keys: Sequence[Ed25519PublicKey],
                 settings: ControlSettings, memory_since: float = 0.0) -> None:
        """
        Args:
            memory_since: when the control store (the memory of applied ids) was
                created, Unix seconds; commands issued before it are refused.
        """
        self.edge_id = edge_id
        self._keys = list(trusted_keys)
        self._settings = settings
        self._memory_since = memory_since

    def open(self, data: bytes) -> OpenedCommand:
        """Verify a message and check it is addressed to this edge.

        Raises:
            CommandRejected: not authentic, malformed, or for another edge.
        """
        opened = open_command(data, self._keys)
        env = opened.envelope
        if env.edge != self.edge_id:
            raise CommandRejected(
                "wrong_edge", f"command is addressed to edge {env.edge!r}, this is "
                f"{self.edge_id!r}", command_id=env.id, digest=opened.digest,
            )
        return opened

    def admit(self, opened: OpenedCommand, *, now: float) -> BaseModel:
        """Check an authentic command against time and local policy; returns its spec.

        Raises:
            CommandRejected: ``expired``, ``not_yet_valid``, ``not_allowed``,
                ``unknown_kind`` or ``invalid_spec``.
        """
        env = opened.envelope
        s = self._settings

        def reject(code: str, message: str) -> CommandRejected:
            return CommandRejected(code, message, command_id=env.id, digest=opened.digest)

        if now >= env.expires_at:
            raise reject("expired", f"expired at {iso_time(env.expires_at)}, received at "
                         f"{iso_time(now)} (edge clock)")
        if env.issued_at > now + s.max_clock_skew_s:
            raise reject("not_yet_valid", f"issued at {iso_time(env.issued_at)}, more than "
                         f"{s.max_clock_skew_s:g}s ahead of this edge's clock ({iso_time(now)})")
        if env.expires_at - env.issued_at > s.max_ttl_s:
            raise reject("ttl_too_long", f"lives {env.expires_at - env.issued_at:g}s, above "
                         f"this edge's maximum of {s.max_ttl_s:g}s (control.max_ttl_s)")
        if env.issued_at < self._memory_since - s.max_clock_skew_s:
            raise reject("before_memory", f"issued at {iso_time(env.issued_at)}, before this "
                         f"edge's command memory was created ({iso_time(self._memory_since)}, "
                         f"less {s.max_clock_skew_s:g}s of clock skew): it may have been "
                         "applied already; send it again if it is wanted")
        return self.allow(env.kind, env.spec, reject)

    def allow(self, kind: str, raw_spec: Any,
              reject: Callable[[str, str], CommandRejected] | None = None) -> BaseModel:
        """The local-policy half of :meth:`admit`: a kind this edge allows, a valid spec, a
        target inside the allow-lists and an allowed registry; returns the parsed spec.
        The desired-state reconciler checks each change it would make here too.

        Raises:
            CommandRejected: ``not_allowed``, ``unknown_kind`` or ``invalid_spec``.
        """
        s = self._settings
        reject = reject or CommandRejected
        env_kind = kind
        if env_kind not in s.allowed_kinds:
            raise reject("not_allowed", f"kind {env_kind!r} is not allowed on this edge "
                         f"(allowed: {', '.join(s.allowed_kinds) or 'none'})")
        try:
            spec = parse_spec(env_kind, raw_spec)
        except InvalidInput as exc:
            code = "unknown_kind" if env_kind not in KINDS else "invalid_spec"
            raise reject(code, str(exc)) from exc
        if isinstance(spec, KubernetesTarget):
            if not _matches(spec.namespace, s.allowed_namespaces):
                raise reject("not_allowed", f"namespace {spec.namespace!r} is not allowed on "
                             f"this edge (allowed: {', '.join(s.allowed_namespaces) or 'none'})")
            patterns = s.allowed_configmaps if isinstance(spec, ConfigMapPatch) else (
                s.allowed_deployments)
            what = "configmap" if isinstance(spec, ConfigMapPatch) else "deployment"
            if not _matches(spec.target, patterns):
                raise reject("not_allowed", f"{what} {spec.target!r} is not allowed on this "
                             f"edge (allowed: {', '.join(patterns) or 'none'})")
        if isinstance(spec, DeploymentSetImage):
            repository = image_repository(spec.image)
            if not any(fnmatch.fnmatchcase(repository, p)
                       or fnmatch.fnmatchcase(repository, f"{p}/*")
                       for p in s.allowed_registries):
                raise reject("not_allowed", f"image {spec.image!r} ({repository}) is not from "
                             "a registry this edge allows (allowed: "
                             f"{', '.join(s.allowed_registries) or 'none'})")
        return spec


def _matches(value: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)
