"""The bridge's control channel: take commands from ``<prefix>.ctl.<edge>``, act at most
once per command id, and report what happened, durably, on ``<prefix>.evt.<edge>``.

Delivery. A durable JetStream pull consumer (``ctl-<edge>``) with one message
in flight: commands are handled one at a time, in the order they were issued,
and a command sent while the bridge was down is delivered when it returns. The
message is acknowledged only once its outcome is on disk here.

Memory. The :class:`~edge_bridge.control_store.ControlStore`
(``control.sqlite3`` in the buffer directory) remembers every authentic command
it took: id, digest, the stream sequence that carried it, and its state
(``applying``, then the final status). So after any crash:

- the same message redelivered (same stream sequence) whose outcome is known
  is *not* applied again; its final status is reported again;
- one found ``applying`` (the bridge died mid-apply) is applied again - every
  kind is an idempotent "make it so" - unless it has expired meanwhile;
- the same id arriving in another message is a replay: ``rejected``.

Messages that fail verification are reported but not remembered, so a forger
cannot burn the id of a real command.

Desired state. The channel also runs the edge's desired-state reconciler
(:mod:`edge_bridge.desired_state`) with the same gate, appliers and outbox, and
wakes it after every applied command, so an imperative change that diverges from
the desired state shows as drift at once.

Status outbox. Each status report (``delivered``, then ``applied`` /
``failed`` / ``rejected`` / ``expired``) is written to the store's outbox in the
same transaction as the state it reports, and a publisher sends the outbox in order
with JetStream acks (``Nats-Msg-Id`` per entry), deleting only what was
acknowledged. Reports produced while NATS is unreachable go out on reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import FetchTimeoutError, NotFoundError
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from broker.backoff import backoff_s
from broker.errors import ApplyFailed, ClosedError, CommandRejected
from broker.long_polling import fetch_one_unless
from broker.opening import Opened
from broker.protocol.command_specs import BridgeConfigure
from broker.protocol.command_status import FINAL_STATUSES
from broker.protocol.commands import OpenedCommand, load_public_keys
from broker.protocol.events import CommandStatusReport, Event
from broker.protocol.topology import Topology
from broker.settings import ControlSettings
from edge_bridge.admission import CommandGate
from edge_bridge.applying import Appliers, KubernetesApplier
from edge_bridge.control_store import CONTROL_DB, ControlStore
from edge_bridge.desired_state import Reconciler
from edge_bridge.metrics import ControlMetrics

__all__ = ["ControlChannel"]

log = structlog.get_logger(__name__)

_FORGET_AFTER_S = 7 * 24 * 3600.0
"""Remembered ids are dropped this long after they expire: an expired command is refused
anyway, so forgetting it cannot let a replay through."""


class ControlChannel(Opened):
    """Consumes, applies and reports the commands of one edge. An async context manager;
    :meth:`run_forever` is one root task of the bridge."""

    def __init__(
        self,
        *,
        edge_id: str,
        topology: Topology,
        settings: ControlSettings,
        directory: Path,
        registry: CollectorRegistry,
        configure: Callable[[BridgeConfigure], Awaitable[dict[str, Any]]],
        bridge_config: Callable[[], dict[str, Any]] | None = None,
        publish_timeout_s: float = 5.0,
        sync_mode: str = "full",
    ) -> None:
        """
        Args:
            bridge_config: the bridge's effective configuration (what the desired-state
                reconciler observes of the bridge); default: nothing observed.
        """
        self.edge_id = edge_id
        self.settings = settings
        self._topology = topology
        self._publish_timeout = publish_timeout_s
        self.store = ControlStore(Path(directory) / CONTROL_DB, sync_mode=sync_mode)
        self.metrics = ControlMetrics(registry)
        self.appliers = Appliers(
            configure=configure,
            kubernetes=KubernetesApplier(settings, on_conflict=self.metrics.kube_conflicts.inc),
        )
        self.gate: CommandGate | None = None
        self.desired = Reconciler(
            edge_id=edge_id, topology=topology, settings=settings, gate=lambda: self.gate,
            appliers=self.appliers, bridge_config=bridge_config or dict,
            report=self._queue_report, directory=Path(directory), registry=registry)
        self._js: JetStreamContext | None = None
        self._attached = asyncio.Event()
        self._outbox_wake = asyncio.Event()
        self._renew_poll = asyncio.Event()
        """Set to end the wait for the next command early (attach, reconnect)."""
        self._state = "new"

    @property
    def durable(self) -> str:
        return self.settings.durable or f"ctl-{self.edge_id}"

    async def open(self) -> None:
        """Load the trusted keys and open the store.

        Raises:
            ConfigError: the public key file is missing or invalid.
        """
        if self._state != "new":
            raise ClosedError(f"control channel is {self._state}; it opens once")
        self._state = "open"
        assert self.settings.public_key_file is not None, "control needs a public key"
        keys = load_public_keys(self.settings.public_key_file)
        await self.store.open()
        self.gate = CommandGate(edge_id=self.edge_id, trusted_keys=keys, settings=self.settings,
                                memory_since=self.store.created_at)
        self.metrics.outbox.set(await self.store.outbox_size())
        log.info("control_ready", edge=self.edge_id, trusted_keys=len(keys),
                 allowed_kinds=self.settings.allowed_kinds,
                 allowed_namespaces=self.settings.allowed_namespaces)

    async def close(self) -> None:
        """Close the store and the Kubernetes client; idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        self.appliers.close()
        await self.store.close()

    def attach(self, js: JetStreamContext, nc: NATS | None = None) -> None:
        """Give the channel a JetStream context once NATS is connected (and the
        connection, for the desired state's live updates)."""
        self._js = js
        self._attached.set()
        self._outbox_wake.set()
        self._renew_poll.set()
        if nc is not None:
            self.desired.attach(js, nc)

    def reconnected(self) -> None:
        """NATS is back: the pull request waiting for the next command may have been
        lost with the old connection, so it is renewed now rather than at its expiry."""
        self._renew_poll.set()
        self._outbox_wake.set()

    async def _queue_report(self, event: Event) -> None:
        await self.store.enqueue(event)
        self._outbox_wake.set()

    async def run_forever(self) -> None:
        """Consume commands and publish status reports until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._consume_forever(), name="control-consume")
            tasks.create_task(self._publish_forever(), name="control-report")
            tasks.create_task(self._forget_forever(), name="control-forget")
            tasks.create_task(self.desired.run_forever(), name="desired-state")

    # -- consuming ------------------------------------------------------------------------

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        config = self._topology.control_consumer_config(
            self.edge_id, durable=self.durable, ack_wait_s=self.settings.ack_wait_s)
        attempt = 0
        while True:
            await self._attached.wait()
            assert self._js is not None
            try:
                # The cloud creates ctl-<edge> (`edgesync edges add`); an edge confined to
                # its own subjects may only read it. Against an open server, create it
                # or update the settings that may change (ack_wait).
                try:
                    info = await self._js.consumer_info(
                        self._topology.control_stream, self.durable)
                except NotFoundError:
                    info = None
                if info is None or info.config.ack_wait != config.ack_wait:
                    await self._js.add_consumer(self._topology.control_stream, config)
                return await self._js.pull_subscribe_bind(
                    self.durable, stream=self._topology.control_stream)
            except Exception as exc:
                attempt += 1
                delay = backoff_s(attempt, base_s=0.2)
                log.warning("control_subscribe_failed", attempt=attempt,
                            retry_in_s=round(delay, 2), error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(delay)

    async def _consume_forever(self) -> None:
        while True:
            sub = await self._subscribe()
            log.info("control_consuming", edge=self.edge_id, durable=self.durable)
            try:
                await self._pull_until_lost(sub)
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            # The consumer is gone (JetStream's store wiped or restored, the consumer
            # deleted): bound again once it exists, or made again where we may.
            log.warning("control_consumer_missing", edge=self.edge_id, durable=self.durable,
                        hint="JetStream lost it; re-created by `edgesync edges repair` (or "
                             "by the bridge on a server without authorization)")

    async def _pull_until_lost(self, sub: JetStreamContext.PullSubscription) -> None:
        """Take commands from ``sub`` until its consumer is found missing."""
        failures = 0
        while True:
            try:
                # One long request for the next command, renewed early on a
                # reconnect (the request may have been lost with the connection).
                self._renew_poll.clear()
                msgs = await fetch_one_unless(sub, timeout=self.settings.poll_s,
                                              interrupt=self._renew_poll)
            except (FetchTimeoutError, nats.errors.TimeoutError, TimeoutError):
                continue
            except Exception as exc:  # disconnected (nats-py reconnects), or no consumer
                failures += 1
                log.debug("control_fetch_failed", error=f"{type(exc).__name__}: {exc}")
                if await self._consumer_missing():
                    return
                await asyncio.sleep(backoff_s(failures, base_s=0.5, cap_s=5.0))
                continue
            failures = 0
            for msg in msgs:
                await self._process(msg)

    async def _consumer_missing(self) -> bool:
        """Whether JetStream says the control consumer (or its stream) does not exist;
        False when it cannot tell (NATS unreachable)."""
        assert self._js is not None
        try:
            await self._js.consumer_info(self._topology.control_stream, self.durable)
        except NotFoundError:
            return True
        except Exception:
            return False
        return False

    async def _process(self, msg: Msg) -> None:
        try:
            stream_seq = int(msg.metadata.sequence.stream)
        except Exception:  # not a JetStream message: nothing to remember it by
            stream_seq = 0
        ticker = asyncio.create_task(self._signal_progress(msg), name="control-progress")
        try:
            await self.handle(msg.data, stream_seq=stream_seq)
        except (asyncio.CancelledError, ClosedError):
            raise
        except Exception as exc:
            # The outcome is not on disk (e.g. the disk is full): leave the message
            # unacknowledged so JetStream redelivers it after ack_wait.
            log.error("command_handling_failed", stream_seq=stream_seq,
                      error=f"{type(exc).__name__}: {exc}")
            return
        finally:
            ticker.cancel()
        with contextlib.suppress(Exception):
            await msg.ack()

    async def _signal_progress(self, msg: Msg) -> None:
        """Keep JetStream from redelivering a command that is still being applied."""
        interval = max(0.2, self.settings.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def handle(self, data: bytes, *, stream_seq: int) -> str:
        """Take one command message: verify, remember, apply, report.

        Returns:
            The final status (or ``redelivered`` when an outcome was only re-reported).
        """
        assert self.gate is not None, "control channel not open"
        now = time.time()
        self.metrics.received.inc()
        try:
            opened = self.gate.open(data)
        except CommandRejected as exc:
            # Not authentic, or not ours: reported, never remembered.
            await self._refuse(exc, kind="")
            return "rejected"
        env = opened.envelope
        known = await self.store.lookup(env.id)
        resume = False
        if known is not None:
            if known.stream_seq != stream_seq or known.digest != opened.digest:
                await self._refuse(CommandRejected(
                    "replay", f"command {env.id} was already received (state {known.state}); "
                    "an id is acted on at most once", command_id=env.id, digest=opened.digest,
                ), kind=env.kind)
                return "rejected"
            if known.state in FINAL_STATUSES:
                log.info("command_redelivered", command=env.id, status=known.state)
                # Same report as the first time (same edge time), so the cloud sees one
                # outcome however often it is repeated.
                await self.store.enqueue(self._status(
                    env.id, opened.digest, known.state, code=known.code, reason=known.reason,
                    result=known.result, reported_at=known.finished_at))
                self._outbox_wake.set()
                return "redelivered"
            resume = True  # we died mid-apply; every kind is safe to apply again
            log.warning("command_resumed", command=env.id, kind=env.kind)
        try:
            spec = self.gate.admit(opened, now=now)
        except CommandRejected as exc:
            status = "expired" if exc.code == "expired" else "rejected"
            if resume:
                status, exc = "failed", CommandRejected(
                    exc.code, f"interrupted by a bridge restart and not resumed: {exc}; the "
                    "change may be partly applied", command_id=env.id, digest=opened.digest)
            event = self._status(env.id, opened.digest, status, code=exc.code, reason=str(exc))
            if resume:
                await self.store.finish(env.id, event)
            else:
                await self.store.remember(opened, stream_seq=stream_seq, state=status,
                                          received_at=now, event=event)
            self._count_refusal(exc.code, env.kind, status)
            log.warning("command_rejected", command=env.id, kind=env.kind, code=exc.code,
                        status=status, reason=str(exc))
            self._outbox_wake.set()
            return status
        if not resume:
            await self.store.remember(opened, stream_seq=stream_seq, state="applying",
                                      received_at=now,
                                      event=self._status(env.id, opened.digest, "delivered"))
            self._outbox_wake.set()
        log.info("command_delivered", command=env.id, kind=env.kind, issuer=env.issuer)
        return await self._apply(opened, spec, now=now)

    async def _apply(self, opened: OpenedCommand, spec: BaseModel, *, now: float) -> str:
        env = opened.envelope
        deadline = min(env.expires_at, now + self.settings.apply_timeout_s)
        started = time.perf_counter()
        try:
            result = await self.appliers.apply(spec, env, deadline=deadline)
        except (ApplyFailed, CommandRejected) as exc:
            event = self._status(env.id, opened.digest, "failed", reason=str(exc),
                                 code=getattr(exc, "code", ""))
            log.warning("command_failed", command=env.id, kind=env.kind, reason=str(exc))
        except Exception as exc:
            # A bug, not a refusal: still a final answer, or the command would be
            # redelivered and retried forever.
            event = self._status(env.id, opened.digest, "failed", code="internal",
                                 reason=f"internal error: {type(exc).__name__}: {exc}")
            log.exception("command_failed", command=env.id, kind=env.kind)
        else:
            event = self._status(env.id, opened.digest, "applied", result=result)
            log.info("command_applied", command=env.id, kind=env.kind, result=result)
            self.desired.wake()  # an imperative change may diverge from the desired state
        self.metrics.apply_seconds.labels(env.kind).observe(time.perf_counter() - started)
        await self.store.finish(env.id, event)
        self.metrics.finished.labels(env.kind, event.status).inc()
        self._outbox_wake.set()
        return event.status

    async def _refuse(self, exc: CommandRejected, *, kind: str) -> None:
        log.warning("command_rejected", command=exc.command_id or None, code=exc.code,
                    reason=str(exc))
        await self.store.enqueue(self._status(exc.command_id, exc.digest, "rejected",
                                              code=exc.code, reason=str(exc)))
        self._count_refusal(exc.code, kind or "unknown", "rejected")
        self._outbox_wake.set()

    def _count_refusal(self, code: str, kind: str, status: str) -> None:
        self.metrics.rejected.labels(code).inc()
        self.metrics.finished.labels(kind, status).inc()

    def _status(self, command_id: str, digest: str, status: str, *, code: str = "",
                reason: str = "", result: dict[str, Any] | None = None,
                reported_at: float | None = None) -> CommandStatusReport:
        return CommandStatusReport(edge=self.edge_id, command_id=command_id, digest=digest,
                             status=status, reported_at=reported_at or time.time(), code=code,
                             reason=reason, result=result)

    # -- reporting ---------------------------------------------------------------------------

    async def _publish_forever(self) -> None:
        subject = self._topology.events_subject(self.edge_id)
        failures = 0
        while True:
            await self._attached.wait()
            self._outbox_wake.clear()
            pending = await self.store.outbox()
            if not pending:
                self.metrics.outbox.set(0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._outbox_wake.wait(), timeout=5.0)
                continue
            for seq, data in pending:
                js = self._js
                assert js is not None
                try:
                    await js.publish(subject, data, timeout=self._publish_timeout, headers={
                        "Nats-Msg-Id": f"status:{self.edge_id}:{self.store.epoch}:{seq}"})
                except Exception as exc:
                    failures += 1
                    delay = backoff_s(failures)
                    log.warning("command_status_publish_failed", attempt=failures,
                                retry_in_s=round(delay, 2), error=f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(delay)
                    break
                failures = 0
                await self.store.sent(seq)
            self.metrics.outbox.set(await self.store.outbox_size())

    async def _forget_forever(self) -> None:
        while True:
            forgotten = await self.store.forget_expired(time.time() - _FORGET_AFTER_S)
            if forgotten:
                log.info("command_ids_forgotten", count=forgotten)
            await asyncio.sleep(3600)
