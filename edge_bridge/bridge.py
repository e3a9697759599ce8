"""The edge bridge daemon: buffer, ingress, shipper and heartbeats under one roof.

``Bridge`` owns every resource (buffer file, NATS connection, HTTP socket,
tasks); :func:`run` is the service shape the CLI, ``edgesync up`` and the tests
all embed::

    async with Bridge(settings, nats_settings) as bridge:
        await bridge.serve(stop)

Shutdown order matters for durability: stop accepting HTTP, let in-flight
appends commit, stop the shipper (in-flight publishes get a short deadline),
close NATS, and close the buffer last.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from typing import TYPE_CHECKING, Any

import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from broker import __version__
from broker.backoff import backoff_s
from broker.connecting import close_nats, connect_with_retry
from broker.errors import ClosedError
from broker.protocol.events import Heartbeat, StreamHealth, encode_event
from broker.protocol.permissions import inbox_prefix
from broker.protocol.topology import Topology
from broker.service import Service, Supervisor
from broker.serving import HTTP_DRAIN_S, EmbeddedServer, embedded_server, wait_started
from broker.settings import BridgeSettings, NatsSettings
from edge_bridge.acknowledging import DropReporter, WatermarkFollower
from edge_bridge.buffer import Buffer
from edge_bridge.configuring import RuntimeConfig
from edge_bridge.ingress import create_ingress
from edge_bridge.metrics import BridgeMetrics
from edge_bridge.producers import ProducerGate
from edge_bridge.shipping import BATCH_OVERHEAD_BYTES, Shipper

if TYPE_CHECKING:
    from broker.protocol.command_specs import BridgeConfigure
    from edge_bridge.commanding import ControlChannel

__all__ = ["Bridge"]

log = structlog.get_logger(__name__)

_STABLE_CONNECTION_S = 60.0
"""A NATS connection that lived this long before it was given up resets the pacing of
new ones."""



class Bridge(Service):
    """One edge bridge. Use as an async context manager, then :meth:`serve`."""

    kind = "bridge"
    version = __version__

    def __init__(self, settings: BridgeSettings, nats_settings: NatsSettings) -> None:
        super().__init__()
        # Our own copy: bridge.configure changes it live, the caller's stays as given.
        self.settings = settings = settings.model_copy(deep=True)
        self.nats_settings = nats_settings
        self.edge_id = settings.edge_id
        self.topology = Topology(prefix=nats_settings.prefix, replicas=nats_settings.replicas)
        self.metrics = BridgeMetrics(settings.edge_id)
        self.buffer = Buffer(
            settings.buffer_dir,
            max_bytes=settings.buffer_max_bytes,
            policy_for=settings.policy_for,
            sync_mode=settings.sync_mode,
            max_streams=settings.max_streams,
        )
        self.shipper = Shipper(
            self.buffer,
            edge_id=settings.edge_id,
            topology=self.topology,
            settings=settings.shipper,
            policy_for=settings.policy_for,
            metrics=self.metrics,
            publish_timeout_s=nats_settings.publish_timeout_s,
        )
        self.runtime_config = RuntimeConfig(settings.buffer_dir, self.metrics.registry)
        self.producers = ProducerGate([])  # the settings' own, checked at start (_open)
        self.control: ControlChannel | None = None
        if settings.control.public_key_file is not None:
            from edge_bridge.commanding import ControlChannel  # only bridges that take commands

            self.control = ControlChannel(
                edge_id=settings.edge_id, topology=self.topology, settings=settings.control,
                directory=settings.buffer_dir, registry=self.metrics.registry,
                configure=self.configure,
                bridge_config=lambda: self.runtime_config.effective(self.settings),
                publish_timeout_s=nats_settings.publish_timeout_s,
                sync_mode=settings.sync_mode,
            )
        self._heartbeat_wake = asyncio.Event()
        self._nc: NATS | None = None
        self.watermarks: WatermarkFollower | None = None
        self.drops: DropReporter | None = None
        self._server: EmbeddedServer | None = None
        self.accepting = False

    # -- lifecycle ----------------------------------------------------------------

    def log_context(self) -> dict[str, str]:
        return {"edge": self.edge_id}

    async def _open(self) -> None:
        self.producers = ProducerGate.from_settings(self.settings)
        # Before anything is opened: an unusable overrides file fails start-up cleanly.
        self.runtime_config.restore(self.settings, self.shipper)
        await self.buffer.open()
        if self.control is not None:
            await self.control.open()
        self._listen(self.settings.host, self.settings.port)

    async def _close(self) -> None:
        self.accepting = False
        if self._nc is not None:
            await close_nats(self._nc)
            self._nc = None
        if self.control is not None:
            await self.control.close()
        await self.buffer.close()
        log.info("bridge_stopped")

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    @property
    def nats_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    # -- the service ----------------------------------------------------------------

    async def serve(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set, then shut down in order within a deadline.

        Raises:
            Exception: the error of the first root task that ended unasked
                (:class:`~broker.errors.RootTaskEnded` if it just returned).
        """
        sock = self.listener
        self._server = server = embedded_server(create_ingress(self))
        with self.bound_log_context():
            async with Supervisor("bridge") as roots:
                http = roots.start(server.serve(sockets=[sock]), name="ingress")
                roots.start(self._connect_and_follow(), name="nats")
                shipper = roots.start(self.shipper.run_forever(), name="shipper")
                roots.start(self._heartbeat_forever(), name="heartbeat")
                roots.start(self._housekeeping_forever(), name="housekeeping")
                if self.control is not None:
                    roots.start(self.control.run_forever(), name="control")
                roots.on_shutdown(functools.partial(self._shutdown, server, roots, http, shipper))
                if await wait_started(server, http):
                    self.accepting = True
                    log.info("bridge_started", url=self.url, buffer=str(self.buffer.path))
                    if ready is not None:
                        ready.set()
                await roots.wait(stop)

    async def _shutdown(self, server: EmbeddedServer, roots: Supervisor,
                        http: asyncio.Task[None], shipper: asyncio.Task[None]) -> None:
        """Stop HTTP, let in-flight appends commit, then stop the shipper and the rest."""
        self.accepting = False
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(http), timeout=HTTP_DRAIN_S)
        self.shipper.begin_shutdown()  # in-flight publishes get a short deadline
        for task in roots.roots:
            if task is not http and task is not shipper:
                task.cancel()
        await asyncio.wait(roots.roots)

    async def _connect_and_follow(self) -> None:
        """Connect (retrying), then follow committed watermarks and report drops; connect
        anew whenever the connection is closed for good.

        nats-py reconnects by itself after a lost link, but gives a connection up (closed,
        never reconnected) when the server ends it with an error it does not retry (e.g.
        a message over ``max_payload``): the bridge then makes a new one, or it would
        stay cut off until restarted."""
        given_up = 0
        while True:
            closed = asyncio.Event()
            started = time.monotonic()
            await self._connect_and_follow_once(closed)
            self.shipper.attach(None)
            self.metrics.nats_connected.set(0)
            old, self._nc = self._nc, None
            if old is not None:
                await close_nats(old)
            # Paced, should the server keep ending fresh connections at once.
            given_up = 1 if time.monotonic() - started > _STABLE_CONNECTION_S else given_up + 1
            delay = backoff_s(given_up, base_s=0.5, cap_s=5.0)
            log.error("nats_connection_given_up", reconnect_in_s=round(delay, 2))
            await asyncio.sleep(delay)

    async def _connect_and_follow_once(self, closed: asyncio.Event) -> None:
        """One connection's life: returns once nats-py has closed it for good."""
        js: JetStreamContext | None = None

        async def disconnected() -> None:
            self.metrics.nats_connected.set(0)
            self.shipper.attach(None)

        async def reconnected() -> None:
            self.metrics.nats_connected.set(1)
            if js is not None:
                self.shipper.attach(js, max_payload=nc.max_payload)
            if self.control is not None:
                self.control.reconnected()

        async def on_closed() -> None:
            closed.set()

        nc = await connect_with_retry(
            self.nats_settings, name=f"edgesync-bridge-{self.edge_id}",
            inbox_prefix=inbox_prefix(self.topology, "edge", self.edge_id),
            disconnected_cb=disconnected, reconnected_cb=reconnected, closed_cb=on_closed,
        )
        self._nc = nc
        self.metrics.nats_connected.set(1)
        self._check_max_payload(nc.max_payload)
        js = nc.jetstream(timeout=self.nats_settings.publish_timeout_s)
        if not await self._wait_for_streams(js, closed):
            return
        self.shipper.attach(js, max_payload=nc.max_payload)
        if self.control is not None:
            self.control.attach(js, nc)
        self._heartbeat_wake.set()  # tell the cloud we are here now, not an interval later
        self.watermarks = WatermarkFollower(
            nc=nc, js=js, shipper=self.shipper, metrics=self.metrics,
        )
        self.drops = DropReporter(
            js=js, shipper=self.shipper, repeat_after_s=self.settings.shipper.retransmit_timeout_s,
        )
        async with asyncio.TaskGroup() as tasks:
            follow = tasks.create_task(self.watermarks.follow_forever(), name="watermarks")
            report = tasks.create_task(self.drops.report_forever(), name="drop-reports")
            await closed.wait()
            follow.cancel()
            report.cancel()

    def _check_max_payload(self, max_payload: int) -> None:
        """Say so, loudly, when the server takes smaller messages than this bridge's
        largest batch may be (the shipper then holds such a batch: see ``TooLarge``)."""
        largest = (max(self.settings.max_record_bytes, self.settings.shipper.batch_max_bytes)
                   + BATCH_OVERHEAD_BYTES)
        if max_payload < largest:
            log.error("nats_max_payload_too_small", max_payload=max_payload,
                      largest_batch_bytes=largest,
                      fix="raise max_payload in nats-server's configuration (edgesync's "
                          "own servers use 8MB) or lower max_record_bytes")

    async def _wait_for_streams(self, js: JetStreamContext, closed: asyncio.Event) -> bool:
        """Wait until the streams this bridge uses exist (True), or the connection is
        given up meanwhile (False). The cloud owns them: a bridge only checks, never
        creates or updates (see :mod:`broker.protocol.topology`)."""
        needed = [self.topology.records_stream, self.topology.events_stream]
        if self.control is not None:
            needed.append(self.topology.control_stream)
        attempt = 0
        while not closed.is_set():
            try:
                await self.topology.require_streams(js, needed)
                return True
            except Exception as exc:
                attempt += 1
                delay = backoff_s(attempt, base_s=0.5, cap_s=5.0)
                log.warning("streams_not_ready", error=f"{type(exc).__name__}: {exc}",
                            retry_in_s=round(delay, 2))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(closed.wait(), timeout=delay)
        return False

    async def _heartbeat_forever(self) -> None:
        while True:
            try:
                await self.send_heartbeat()
            except Exception as exc:
                log.warning("heartbeat_failed", error=f"{type(exc).__name__}: {exc}")
            # Woken early when bridge.configure changes the interval.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._heartbeat_wake.wait(),
                                       timeout=self.settings.heartbeat_interval_s)
            self._heartbeat_wake.clear()

    async def configure(self, change: BridgeConfigure) -> dict[str, Any]:
        """Apply a ``bridge.configure`` change live and persist it in the buffer directory.

        Returns:
            The effective configuration (see :mod:`edge_bridge.configuring`).

        Raises:
            InvalidInput: the change does not combine into valid settings.
            OSError: it could not be persisted; nothing changed.
        """
        effective = self.runtime_config.change(self.settings, self.shipper, change)
        if change.heartbeat_interval_s is not None:
            self._heartbeat_wake.set()
        return effective

    async def heartbeat(self) -> Heartbeat:
        stats = await self.buffer.stats()
        now = time.time()
        streams = {}
        oldest_each = await self.buffer.oldest_received_each(unshipped=False)
        for name in self.buffer.stream_names():
            s = self.buffer.stream_state(name)
            if s is None:
                continue
            oldest = oldest_each.get(name)
            streams[name] = StreamHealth(
                epoch=s.epoch, next_seq=s.next_seq, shipped_seq=s.shipped_seq,
                committed_seq=s.committed_seq, records=s.records, bytes=s.bytes,
                dropped_overflow=s.dropped_overflow, dropped_ttl=s.dropped_ttl,
                oldest_uncommitted_age_s=0.0 if oldest is None else max(0.0, now - oldest),
                trim_floor=s.committed_seq,  # persisted: the buffer trimmed up to it
            )
        return Heartbeat(
            edge=self.edge_id, version=self.version, sent_at=time.time(),
            buffer_records=stats.records, buffer_bytes=stats.bytes,
            buffer_max_bytes=stats.max_bytes, unshipped_records=stats.unshipped_records,
            oldest_unshipped_age_s=stats.oldest_unshipped_age_s, disk_bytes=stats.disk_bytes,
            dropped=stats.dropped, streams=streams,
        )

    async def send_heartbeat(self) -> None:
        """Publish one heartbeat now (best effort: skipped while disconnected)."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            return
        beat = await self.heartbeat()
        await nc.publish(self.topology.events_subject(self.edge_id), encode_event(beat))
        log.debug("heartbeat_sent", backlog=beat.unshipped_records)

    async def _housekeeping_forever(self) -> None:
        while True:
            await asyncio.sleep(60)
            try:
                await self.buffer.prune_producer_requests()
            except ClosedError:
                return

    async def refresh_gauges(self) -> None:
        stats = await self.buffer.stats()
        m = self.metrics
        m.buffer_records.set(stats.records)
        m.buffer_unshipped_records.set(stats.unshipped_records)
        m.buffer_bytes.set(stats.bytes)
        m.buffer_max_bytes.set(stats.max_bytes)
        m.buffer_disk_bytes.set(stats.disk_bytes)
        m.oldest_unshipped_age.set(stats.oldest_unshipped_age_s)
        m.buffer_commits.set(self.buffer.commits)
        m.buffer_quarantined.set(self.buffer.recovery.quarantined)
        m.buffer_lost_records.set(self.buffer.recovery.lost_records)
        m.nats_connected.set(1 if self.nats_connected else 0)
        for stream, reasons in stats.dropped.items():
            for reason, count in reasons.items():
                m.records_dropped.labels(stream, reason).set(count)
