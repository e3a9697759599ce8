"""The bridge's control channel: take commands from ``<prefix>.ctl.<edge>``, act at most
once per command id, and report what happened, durably, on ``<prefix>.evt.<edge>``.

Delivery. A durable JetStream pull consumer (``ctl-<edge>``) with one message
in flight: commands are handled one at a time, in the order they were issued,
and a command sent while the bridge was down is delivered when it returns. The
message is acknowledged only once its outcome is on disk here.

Memory. ``control.sqlite3`` in the buffer directory (apart from the record
buffer) remembers every authentic command it took: id, digest, the stream
sequence that carried it, and its state (``applying``, then the final status).
So after any crash:

- the same message redelivered (same stream sequence) whose outcome is known
  is *not* applied again; its final status is reported again;
- one found ``applying`` (the bridge died mid-apply) is applied again - every
  kind is an idempotent "make it so" - unless it has expired meanwhile;
- the same id arriving in another message is a replay: ``rejected``.

Messages that fail verification are reported but not remembered, so a forger
cannot burn the id of a real command.

Status outbox. Each status report (``delivered``, then ``applied`` /
``failed`` / ``rejected`` / ``expired``) is written to an outbox in the same
transaction as the state it reports, and a publisher sends the outbox in order
with JetStream acks (``Nats-Msg-Id`` per entry), deleting only what was
acknowledged. Reports produced while NATS is unreachable go out on reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import FetchTimeoutError, NotFoundError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel

from broker.backoff import backoff_s
from broker.errors import ClosedError
from broker.protocol.command_specs import BridgeConfigure
from broker.protocol.commands import CommandRejected, OpenedCommand, load_public_keys
from broker.protocol.events import CommandStatus, encode_event
from broker.protocol.topology import Topology
from broker.settings import ControlSettings
from edge_bridge.applying import Appliers, ApplyFailed, CommandGate, KubernetesApplier

__all__ = ["CONTROL_DB", "ControlChannel", "ControlStore", "Remembered"]

log = structlog.get_logger(__name__)
T = TypeVar("T")

CONTROL_DB = "control.sqlite3"
FINAL = frozenset({"applied", "failed", "rejected", "expired"})
_FORGET_AFTER_S = 7 * 24 * 3600.0
"""Remembered ids are dropped this long after they expire: an expired command is refused
anyway, so forgetting it cannot let a replay through."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    stream_seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    code TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    result TEXT,
    expires_at REAL NOT NULL,
    received_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event BLOB NOT NULL,
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Remembered:
    """What the edge remembers of one command it took."""

    id: str
    digest: str
    stream_seq: int
    kind: str
    state: str
    code: str
    reason: str
    result: dict[str, Any] | None
    received_at: float
    finished_at: float | None


class ControlStore:
    """``control.sqlite3``: remembered command ids and the status outbox.

    One connection, used from one worker thread, so operations are serialized
    and never block the event loop. An operation in progress completes even if
    the awaiting task is cancelled.
    """

    def __init__(self, path: Path, *, sync_mode: str = "full") -> None:
        self.path = Path(path)
        self._sync_mode = sync_mode
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self.epoch = ""
        """Random id of this store file, part of every outbox message id."""
        self._state = "new"

    async def __aenter__(self) -> ControlStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Create or open the database (WAL, synchronous as configured)."""
        if self._state != "new":
            raise ClosedError(f"control store is {self._state}; it opens once")
        self._state = "open"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="control-store")
        self.epoch = await self._run(self._init)

    def _init(self) -> str:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if self._sync_mode == 'full' else 'NORMAL'}")
        conn.executescript(_SCHEMA)
        self._conn = conn
        row = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        if row is not None:
            return str(row[0])
        epoch = secrets.token_hex(4)
        conn.execute("INSERT INTO meta(key, value) VALUES ('epoch', ?)", (epoch,))
        return epoch

    async def close(self) -> None:
        """Close the database; idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        executor, self._executor = self._executor, None
        if executor is None:
            return

        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(executor, shut)
        executor.shutdown(wait=True)

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._executor is None or self._state != "open":
            raise ClosedError("control store is closed")
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn)
        return await asyncio.shield(future)

    def _c(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    async def lookup(self, command_id: str) -> Remembered | None:
        def q() -> Remembered | None:
            row = self._c().execute(
                "SELECT id, digest, stream_seq, kind, state, code, reason, result, received_at,"
                " finished_at FROM commands WHERE id = ?", (command_id,)).fetchone()
            if row is None:
                return None
            result = json.loads(row[7]) if row[7] else None
            return Remembered(row[0], row[1], row[2], row[3], row[4], row[5], row[6], result,
                              row[8], row[9])
        return await self._run(q)

    async def remember(self, opened: OpenedCommand, *, stream_seq: int, state: str,
                       received_at: float, event: CommandStatus) -> None:
        """Remember a command the edge took (``applying`` or a refusal) and queue its status."""
        env = opened.envelope

        def q() -> None:
            c = self._c()
            with _transaction(c):
                c.execute(
                    "INSERT INTO commands(id, digest, stream_seq, kind, state, code, reason,"
                    " expires_at, received_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT(id) DO UPDATE SET state = excluded.state",
                    (env.id, opened.digest, stream_seq, env.kind, state, event.code, event.reason,
                     env.expires_at, received_at, received_at if state in FINAL else None),
                )
                c.execute("INSERT INTO outbox(event, created_at) VALUES (?, ?)",
                          (encode_event(event), time.time()))
        await self._run(q)

    async def finish(self, command_id: str, event: CommandStatus) -> None:
        """Record the final status of a command and queue its report, atomically."""
        def q() -> None:
            c = self._c()
            with _transaction(c):
                c.execute(
                    "UPDATE commands SET state = ?, code = ?, reason = ?, result = ?,"
                    " finished_at = ? WHERE id = ?",
                    (event.status, event.code, event.reason,
                     None if event.result is None else json.dumps(event.result),
                     event.reported_at, command_id),
                )
                c.execute("INSERT INTO outbox(event, created_at) VALUES (?, ?)",
                          (encode_event(event), time.time()))
        await self._run(q)

    async def enqueue(self, event: CommandStatus) -> None:
        """Queue a status report about something not remembered (or reported again)."""
        def q() -> None:
            self._c().execute("INSERT INTO outbox(event, created_at) VALUES (?, ?)",
                              (encode_event(event), time.time()))
        await self._run(q)

    async def outbox(self, limit: int = 64) -> list[tuple[int, bytes]]:
        """The oldest unsent status reports, in order."""
        def q() -> list[tuple[int, bytes]]:
            rows = self._c().execute(
                "SELECT seq, event FROM outbox ORDER BY seq LIMIT ?", (limit,)).fetchall()
            return [(int(r[0]), bytes(r[1])) for r in rows]
        return await self._run(q)

    async def sent(self, seq: int) -> None:
        """Forget one report JetStream acknowledged."""
        def q() -> None:
            self._c().execute("DELETE FROM outbox WHERE seq = ?", (seq,))
        await self._run(q)

    async def outbox_size(self) -> int:
        def q() -> int:
            return int(self._c().execute("SELECT count(*) FROM outbox").fetchone()[0])
        return await self._run(q)

    async def forget_expired(self, before: float) -> int:
        """Drop remembered commands (not mid-apply) that expired before ``before``."""
        def q() -> int:
            cur = self._c().execute(
                "DELETE FROM commands WHERE expires_at < ? AND state != 'applying'", (before,))
            return int(cur.rowcount)
        return await self._run(q)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Any:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class ControlMetrics:
    """What an operator graphs about the control channel of one bridge."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.received = Counter(
            "edgesync_commands_received", "Command messages taken from the control subject.",
            registry=r)
        self.finished = Counter(
            "edgesync_commands_finished", "Commands by kind and final status.",
            ["kind", "status"], registry=r)
        self.rejected = Counter(
            "edgesync_commands_rejected", "Commands refused, by reason code.", ["code"],
            registry=r)
        self.apply_seconds = Histogram(
            "edgesync_command_apply_seconds", "Time to carry out an admitted command.",
            ["kind"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r)
        self.outbox = Gauge(
            "edgesync_command_status_outbox", "Status reports not yet acknowledged by JetStream.",
            registry=r)
        self.kube_conflicts = Counter(
            "edgesync_kubernetes_conflicts", "Kubernetes writes retried after 409 Conflict.",
            registry=r)


class ControlChannel:
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
        publish_timeout_s: float = 5.0,
        sync_mode: str = "full",
    ) -> None:
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
        self._js: JetStreamContext | None = None
        self._attached = asyncio.Event()
        self._outbox_wake = asyncio.Event()
        self._state = "new"

    @property
    def durable(self) -> str:
        return self.settings.durable or f"ctl-{self.edge_id}"

    async def __aenter__(self) -> ControlChannel:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

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
        self.gate = CommandGate(edge_id=self.edge_id, trusted_keys=keys, settings=self.settings)
        await self.store.open()
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

    def attach(self, js: JetStreamContext) -> None:
        """Give the channel a JetStream context once NATS is connected."""
        self._js = js
        self._attached.set()
        self._outbox_wake.set()

    async def run_forever(self) -> None:
        """Consume commands and publish status reports until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._consume_forever(), name="control-consume")
            tasks.create_task(self._publish_forever(), name="control-report")
            tasks.create_task(self._forget_forever(), name="control-forget")

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
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                delay = backoff_s(attempt, base_s=0.2)
                log.warning("control_subscribe_failed", attempt=attempt,
                            retry_in_s=round(delay, 2), error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(delay)

    async def _consume_forever(self) -> None:
        sub = await self._subscribe()
        log.info("control_consuming", edge=self.edge_id, durable=self.durable)
        try:
            while True:
                try:
                    msgs = await sub.fetch(1, timeout=1.0)
                except (FetchTimeoutError, nats.errors.TimeoutError):
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # disconnected: nats-py reconnects by itself
                    log.debug("control_fetch_failed", error=f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    await self._process(msg)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

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
            if known.state in FINAL:
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
                reported_at: float | None = None) -> CommandStatus:
        return CommandStatus(edge=self.edge_id, command_id=command_id, digest=digest,
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
                except asyncio.CancelledError:
                    raise
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
