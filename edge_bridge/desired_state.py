"""The edge's desired-state reconciler: level-triggered, newest revision wins.

The cloud keeps one signed desired-state message per edge in the KV bucket
``<P>_DESIRED`` (key ``<edge>``, history 1; :mod:`broker.protocol.desired`). The
reconciler reads it when told (live updates on ``$KV.<P>_DESIRED.<edge>``), after
an imperative command changed something, and every
``control.desired_recheck_interval_s`` whatever happened - so an edge that was
offline for a week reads the newest value when it returns, and never the
versions that were superseded meanwhile.

Each pass:

1. verify the message (signature, addressed to this edge: the command gate) and
   its revision: never lower than the one this edge last applied
   (``desired-state.json`` in the buffer directory remembers it);
2. check every change the document could make against the local allow-lists
   (:meth:`edge_bridge.admission.CommandGate.allow`) - a refusal is ``rejected``;
3. observe the managed fields (:mod:`edge_bridge.observing`) and compare;
4. on a *new* revision, apply only the fields that differ, through the same
   appliers as the commands, then wait until every Deployment named is healthy
   (``control.desired_health_timeout_s``) - ``healthy`` or ``failed``;
   on the same revision, report drift (``drifted``) and leave it, unless
   ``control.desired_correct_drift`` is on (Argo CD's *self-heal*): an operator's
   quick ``edgesync cmd scale`` stays until the next version, and shows as drift.

Reports (:class:`~broker.protocol.events.DesiredStateReport`) go through the
control store's outbox, in order, so those produced offline reach the cloud on
reconnect. Every pass reports, changed or not, so a report lost or not counted
is repaired at the next re-check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from broker.durable_files import write_atomically
from broker.errors import ApplyFailed, CommandRejected, InvalidInput, TemporaryError
from broker.protocol.command_specs import EnvFromSecret, describe_validation_error
from broker.protocol.commands import CommandEnvelope, OpenedCommand
from broker.protocol.desired import (
    DESIRED_KIND,
    DesiredDocument,
    DesiredStateSpec,
    Drift,
    compare,
    parse_document,
    restart_stamp,
    split_target,
)
from broker.protocol.events import DesiredStateReport, Event
from broker.protocol.topology import Topology
from broker.settings import ControlSettings
from edge_bridge.admission import CommandGate
from edge_bridge.applying import Appliers
from edge_bridge.metrics import DesiredStateMetrics
from edge_bridge.observing import deployment_health, observe

__all__ = ["MEMORY_FILE", "Reconciler", "changes_for"]

log = structlog.get_logger(__name__)

MEMORY_FILE = "desired-state.json"
_HEALTH_POLL_S = 0.25
"""How often a Deployment's rollout is read while waiting for it to complete."""


def changes_for(document: DesiredDocument, drift: list[Drift]
                ) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """The commands that remove ``drift``, and the drift no command can remove (an
    object or container that does not exist: the edge does not create workloads).

    Paths are matched as :func:`~broker.protocol.desired.compare` builds them, walking
    the document (object names may contain dots, so paths are never split).

    Returns:
        ``(kind, spec)`` pairs in apply order (bridge, ConfigMaps, Deployments; a
        restart's spec carries its ``restarted_at``), and problems in words.
    """
    differs = {d.path for d in drift}
    out: list[tuple[str, dict[str, Any]]] = []
    problems: list[str] = []
    if document.bridge is not None and any(p.startswith("bridge.") for p in differs):
        out.append(("bridge.configure",
                    document.bridge.model_dump(mode="json", exclude_unset=True)))
    for target, data in document.configmaps.items():
        base = f"configmaps.{target}"
        if base in differs:
            problems.append(f"configmap {target} does not exist")
            continue
        changed = {k: v for k, v in data.items() if f"{base}.data.{k}" in differs}
        if changed:
            out.append(("configmap.patch", {**_where(target), "data": changed}))
    for target, dep in document.deployments.items():
        base = f"deployments.{target}"
        if base in differs:
            problems.append(f"deployment {target} does not exist")
            continue
        for name, container in dep.containers.items():
            cbase = f"{base}.containers.{name}"
            if cbase in differs:
                problems.append(f"container {name} not found in deployment {target}")
                continue
            env = {k: v.as_kubernetes() if isinstance(v, EnvFromSecret) else v
                   for k, v in container.env.items() if f"{cbase}.env.{k}" in differs}
            if env:
                out.append(("deployment.set_env", {**_where(target), "container": name,
                                                   "env": env}))
            if f"{cbase}.image" in differs:
                out.append(("deployment.set_image", {**_where(target), "container": name,
                                                     "image": container.image}))
        if f"{base}.replicas" in differs:
            out.append(("deployment.scale", {**_where(target), "replicas": dep.replicas}))
        if f"{base}.restarted_at" in differs:
            out.append(("deployment.restart", {**_where(target),
                                               "restarted_at": dep.restarted_at}))
    return out, problems


def _where(target: str) -> dict[str, str]:
    namespace, name = split_target(target)
    return {"namespace": namespace, "name": name}


class Reconciler:
    """Keeps one edge at its newest desired state; :meth:`run_forever` is a task of the
    control channel."""

    def __init__(
        self,
        *,
        edge_id: str,
        topology: Topology,
        settings: ControlSettings,
        gate: Callable[[], CommandGate | None],
        appliers: Appliers,
        bridge_config: Callable[[], dict[str, Any]],
        report: Callable[[Event], Awaitable[None]],
        directory: Path,
        registry: CollectorRegistry,
    ) -> None:
        self.edge_id = edge_id
        self._topology = topology
        self._settings = settings
        self._gate = gate
        self._appliers = appliers
        self._bridge_config = bridge_config
        self._report = report
        self._memory_path = Path(directory) / MEMORY_FILE
        self.metrics = DesiredStateMetrics(registry)
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._attached = asyncio.Event()
        self.ready = asyncio.Event()
        """Set once following the bucket (and the Kubernetes client is loaded)."""
        self._wake = asyncio.Event()
        self._pushed: bytes | None = None
        self._kv: KeyValue | None = None
        self._last_report: tuple[Any, ...] | None = None
        self.memory: dict[str, Any] = self._load_memory()
        self.metrics.revision.set(int(self.memory.get("revision", 0)))

    def attach(self, js: JetStreamContext, nc: NATS) -> None:
        self._js, self._nc = js, nc
        self._attached.set()
        self._wake.set()

    def wake(self) -> None:
        """Check now (after an imperative command changed something, say)."""
        self._wake.set()

    # -- memory ------------------------------------------------------------------------

    def _load_memory(self) -> dict[str, Any]:
        try:
            loaded = json.loads(self._memory_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"revision": 0}
        except (OSError, ValueError) as exc:
            # Losing it only means the newest revision is applied once more (idempotent).
            log.warning("desired_memory_unreadable", path=str(self._memory_path),
                        error=str(exc))
            return {"revision": 0}
        return loaded if isinstance(loaded, dict) else {"revision": 0}

    def _remember(self, **fields: Any) -> None:
        self.memory = {**self.memory, **fields}
        self._memory_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self._memory_path, json.dumps(self.memory, sort_keys=True).encode())
        self.metrics.revision.set(int(self.memory.get("revision", 0)))

    # -- the loop ------------------------------------------------------------------------

    async def run_forever(self) -> None:
        await self._attached.wait()
        assert self._nc is not None
        sub_nc = self._nc
        sub = await sub_nc.subscribe(self._topology.desired_subject(self.edge_id),
                                     cb=self._on_update)
        if self._appliers.kubernetes is not None:
            try:  # a rollout's deadline should not pay for importing the client
                await self._appliers.kubernetes.connect()
            except ApplyFailed as exc:  # normal for a bridge-only edge; said once
                log.info("kubernetes_not_configured", error=str(exc))
        self.ready.set()
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(),
                                           timeout=self._settings.desired_recheck_interval_s)
                self._wake.clear()
                if self._nc is not sub_nc and self._nc is not None:
                    # A new connection (the bridge made one after nats-py gave the
                    # last up): the pushes come on it now.
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                    sub_nc = self._nc
                    sub = await sub_nc.subscribe(
                        self._topology.desired_subject(self.edge_id), cb=self._on_update)
                try:
                    await self.reconcile_once()
                except TemporaryError as exc:
                    log.warning("desired_pass_deferred", error=str(exc))
                except Exception as exc:  # one bad pass must not end the bridge
                    log.exception("desired_pass_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_update(self, msg: Msg) -> None:
        self._pushed = msg.data
        self._wake.set()

    async def _latest(self) -> bytes | None:
        """The newest signed desired state: the one pushed just now, else the bucket's."""
        pushed, self._pushed = self._pushed, None
        if pushed:
            return pushed
        assert self._js is not None
        try:
            if self._kv is None:
                self._kv = await self._js.key_value(self._topology.desired_bucket)
            entry = await self._kv.get(self.edge_id)
        except KeyNotFoundError:
            return None
        except BucketNotFoundError:
            self._kv = None  # no ingest has created it yet
            return None
        except Exception as exc:
            raise TemporaryError(f"cannot read the desired state: {type(exc).__name__}: "
                                 f"{exc}") from exc
        return entry.value or None

    async def reconcile_once(self) -> str | None:
        """One pass (see the module docstring); returns the status, None if nothing is
        desired or the message was not for us."""
        gate = self._gate()
        data = await self._latest()
        if gate is None or not data:
            return None
        try:
            opened = gate.open(data)
            if opened.envelope.kind != DESIRED_KIND:
                raise CommandRejected("malformed", f"kind {opened.envelope.kind!r} in the "
                                      "desired-state bucket")
            spec = DesiredStateSpec.model_validate(opened.envelope.spec)
        except (CommandRejected, ValidationError, InvalidInput) as exc:
            reason = (describe_validation_error(exc, prefix="spec")
                      if isinstance(exc, ValidationError) else str(exc))
            log.warning("desired_state_refused", reason=reason)
            self.metrics.passes.labels("refused").inc()
            return None
        remembered = int(self.memory.get("revision", 0))
        if spec.revision < remembered:
            log.warning("desired_state_stale", revision=spec.revision, applied=remembered)
            return None
        new = spec.revision > remembered
        document = parse_document(spec.document)
        try:
            for kind, raw in document.commands():
                gate.allow(kind, raw)
        except CommandRejected as exc:
            if new:
                self._remember(revision=spec.revision, status="rejected")
            return await self._send(opened, spec, "rejected", {}, [], reason=str(exc))
        try:
            observed, _ = await observe(document, self._appliers.kubernetes,
                                        self._bridge_config())
        except ApplyFailed as exc:  # refused or not configured: no retry will help
            if new:
                self._remember(revision=spec.revision, status="failed")
            return await self._send(opened, spec, "failed", {}, [],
                                    reason=f"cannot observe: {exc}")
        drift = compare(document, observed)
        if new or (drift and self._settings.desired_correct_drift):
            return await self._apply(opened, spec, document, drift, gate)
        unhealthy = await self._health_problems(document)
        status = "drifted" if drift else ("failed" if unhealthy else "healthy")
        return await self._send(opened, spec, status, observed, drift,
                                reason="; ".join(unhealthy))

    async def _apply(self, opened: OpenedCommand, spec: DesiredStateSpec,
                     document: DesiredDocument, drift: list[Drift], gate: CommandGate
                     ) -> str:
        started = time.monotonic()
        log.info("desired_state_applying", revision=spec.revision, version=spec.version_id,
                 drift=[d.path for d in drift])
        commands, problems = changes_for(document, drift)
        applied: list[str] = []
        reason = "; ".join(problems)
        if drift:
            await self._send(opened, spec, "applying", {}, drift)
        if not problems:
            try:
                for kind, raw in commands:
                    await self._apply_one(opened.envelope, kind, raw, gate)
                    applied.append(kind)
            except (ApplyFailed, CommandRejected) as exc:
                reason = f"{kind}: {exc}"
        if not reason:
            reason = "; ".join(await self._wait_healthy(document))
        observed, _ = await observe(document, self._appliers.kubernetes,
                                    self._bridge_config())
        after = compare(document, observed)
        if not reason and after:
            reason = "still differs after applying: " + ", ".join(d.path for d in after)
        status = "failed" if reason else "healthy"
        self._remember(revision=spec.revision, status=status)
        self.metrics.apply_seconds.observe(time.monotonic() - started)
        log.info("desired_state_applied", revision=spec.revision, status=status,
                 applied=applied, reason=reason or None)
        return await self._send(opened, spec, status, observed, after, reason=reason,
                                applied=applied)

    async def _apply_one(self, envelope: CommandEnvelope, kind: str, raw: dict[str, Any],
                         gate: CommandGate) -> None:
        issued_at = envelope.issued_at
        if kind == "deployment.restart":
            # The applier stamps a restart with its envelope's issue time: the document's.
            issued_at = restart_stamp(raw.pop("restarted_at"))
        spec = gate.allow(kind, raw)
        one = CommandEnvelope(v=envelope.v, id=envelope.id, edge=envelope.edge, kind=kind,
                              spec=raw, issued_at=issued_at, expires_at=envelope.expires_at,
                              issuer=envelope.issuer)
        await self._appliers.apply(spec, one, deadline=time.time()
                                   + self._settings.apply_timeout_s)

    async def _health_problems(self, document: DesiredDocument) -> list[str]:
        kube = self._appliers.kubernetes
        problems = []
        for target in document.deployments:
            if kube is None:
                break
            namespace, name = split_target(target)
            why = deployment_health(await kube.read("deployment", namespace, name))
            if why is not None:
                problems.append(f"deployment {target}: {why}")
        return problems

    async def _wait_healthy(self, document: DesiredDocument) -> list[str]:
        """Until every Deployment named has completed its rollout, or the deadline; the
        problems left (none: healthy)."""
        deadline = time.monotonic() + self._settings.desired_health_timeout_s
        while True:
            problems = await self._health_problems(document)
            if not problems:
                return []
            if time.monotonic() >= deadline:
                timeout = self._settings.desired_health_timeout_s
                return [f"{p} (after {timeout:g}s)" for p in problems]
            await asyncio.sleep(_HEALTH_POLL_S)

    async def _send(self, opened: OpenedCommand, spec: DesiredStateSpec, status: str,
                    observed: dict[str, Any], drift: list[Drift], *, reason: str = "",
                    applied: list[str] | None = None) -> str:
        drift_rows = [d.model_dump(mode="json") for d in drift]
        key = (spec.revision, status, reason, json.dumps(drift_rows, sort_keys=True))
        self.metrics.passes.labels(status).inc()
        if status != "applying":
            self.metrics.drift.set(len(drift))
        if key != self._last_report and status == "drifted":  # said once per change
            log.warning("desired_state_drifted", revision=spec.revision,
                        fields=[d.path for d in drift])
        self._last_report = key
        # Every pass reports, changed or not: a report lost on the way (or not counted)
        # is repaired by the next re-check, level-triggered like the rest.
        await self._report(DesiredStateReport(
            edge=self.edge_id, revision=spec.revision, version_id=spec.version_id,
            digest=opened.digest, status=status, reported_at=time.time(),
            observed=observed, drift=drift_rows, reason=reason, applied=applied or []))
        return status
