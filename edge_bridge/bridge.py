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
import socket
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
from broker.protocol.topology import Topology
from broker.serving import EmbeddedServer, embedded_server, listen_tcp
from broker.settings import BridgeSettings, NatsSettings
from edge_bridge.acknowledging import DropReporter, WatermarkFollower
from edge_bridge.buffering import Buffer
from edge_bridge.configuring import RuntimeConfig
from edge_bridge.ingress import create_app
from edge_bridge.metrics import BridgeMetrics
from edge_bridge.shipping import Shipper

if TYPE_CHECKING:
    from broker.protocol.command_specs import BridgeConfigure
    from edge_bridge.commanding import ControlChannel

__all__ = ["Bridge", "run"]

log = structlog.get_logger(__name__)

SHUTDOWN_DEADLINE_S = 20.0
"""Hard bound on a clean shutdown; below Kubernetes' default 30 s grace period."""


class Bridge:
    """One edge bridge. Use as an async context manager, then :meth:`serve`."""

    version = __version__

    def __init__(self, settings: BridgeSettings, nats_settings: NatsSettings) -> None:
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
        self.control: ControlChannel | None = None
        if settings.control.public_key_file is not None:
            from edge_bridge.commanding import ControlChannel  # only bridges that take commands

            self.control = ControlChannel(
                edge_id=settings.edge_id, topology=self.topology, settings=settings.control,
                directory=settings.buffer_dir, registry=self.metrics.registry,
                configure=self.configure, publish_timeout_s=nats_settings.publish_timeout_s,
                sync_mode=settings.sync_mode,
            )
        self._heartbeat_wake = asyncio.Event()
        self._nc: NATS | None = None
        self.watermarks: WatermarkFollower | None = None
        self.drops: DropReporter | None = None
        self._sock: socket.socket | None = None
        self._server: EmbeddedServer | None = None
        self._state = "new"
        self.accepting = False

    # -- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> Bridge:
        if self._state != "new":
            raise ClosedError(f"bridge is {self._state}; a Bridge starts once")
        # Before anything is opened: an unusable overrides file fails start-up cleanly.
        self.runtime_config.restore(self.settings, self.shipper)
        self._state = "open"
        await self.buffer.open()
        try:
            if self.control is not None:
                await self.control.open()
            self._sock = listen_tcp(self.settings.host, self.settings.port)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Release everything; idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        self.accepting = False
        if self._nc is not None:
            await close_nats(self._nc)
            self._nc = None
        if self.control is not None:
            await self.control.close()
        await self.buffer.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        log.info("bridge_stopped", edge=self.edge_id)

    @property
    def port(self) -> int:
        assert self._sock is not None, "bridge not started"
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    @property
    def nats_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    # -- the service ----------------------------------------------------------------

    async def serve(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set, then shut down in order within a deadline."""
        assert self._sock is not None, "use `async with Bridge(...)` first"
        self._server = embedded_server(create_app(self))
        http = asyncio.create_task(self._server.serve(sockets=[self._sock]), name="ingress")
        connector = asyncio.create_task(self._connect_and_follow(), name="nats")
        shipper = asyncio.create_task(self.shipper.run_forever(), name="shipper")
        heartbeat = asyncio.create_task(self._heartbeat_forever(), name="heartbeat")
        housekeeping = asyncio.create_task(self._housekeeping_forever(), name="housekeeping")
        roots = [http, connector, shipper, heartbeat, housekeeping]
        if self.control is not None:
            roots.append(asyncio.create_task(self.control.run_forever(), name="control"))
        # uvicorn offers a flag, not an event, for "listening".
        while not self._server.started and not http.done():  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        self.accepting = True
        log.info("bridge_started", edge=self.edge_id, url=self.url,
                 buffer=str(self.buffer.path))
        if ready is not None:
            ready.set()
        stopper: asyncio.Task[None] = asyncio.create_task(_wait(stop), name="stop-wait")
        try:
            waiting: set[asyncio.Task[None]] = {stopper, *roots}
            while stopper in waiting:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                failed = [t for t in done if t is not stopper]
                for task in failed:
                    log.error("bridge_task_failed", task=task.get_name(),
                              error=repr(None if task.cancelled() else task.exception()))
                if failed:
                    break  # one root down: stop them all rather than limp along
        finally:
            stopper.cancel()
            await asyncio.wait_for(self._shutdown(http, roots), timeout=SHUTDOWN_DEADLINE_S)

    async def _shutdown(self, http: asyncio.Task[None], roots: list[asyncio.Task[None]]) -> None:
        self.accepting = False
        if self._server is not None:
            self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(http), timeout=8)
        self.shipper.begin_shutdown()
        for task in roots:
            if task is not http and task.get_name() != "shipper":
                task.cancel()
        results = await asyncio.gather(*roots, return_exceptions=True)
        for task, result in zip(roots, results, strict=True):
            if isinstance(result, Exception):
                log.error("bridge_task_failed", task=task.get_name(), error=repr(result))

    async def _connect_and_follow(self) -> None:
        """Connect (retrying), then follow committed watermarks and report drops."""
        js: JetStreamContext | None = None

        async def disconnected() -> None:
            self.metrics.nats_connected.set(0)
            self.shipper.attach(None)

        async def reconnected() -> None:
            self.metrics.nats_connected.set(1)
            if js is not None:
                self.shipper.attach(js)

        nc = await connect_with_retry(
            self.nats_settings, name=f"edgesync-bridge-{self.edge_id}",
            disconnected_cb=disconnected, reconnected_cb=reconnected,
        )
        self._nc = nc
        self.metrics.nats_connected.set(1)
        js = nc.jetstream(timeout=self.nats_settings.publish_timeout_s)
        await self._wait_for_streams(js)
        self.shipper.attach(js)
        if self.control is not None:
            self.control.attach(js)
        self._heartbeat_wake.set()  # tell the cloud we are here now, not an interval later
        self.watermarks = WatermarkFollower(
            nc=nc, js=js, topology=self.topology, edge_id=self.edge_id, buffer=self.buffer,
            shipper=self.shipper, metrics=self.metrics,
        )
        self.drops = DropReporter(
            js=js, topology=self.topology, edge_id=self.edge_id, buffer=self.buffer,
            repeat_after_s=self.settings.shipper.retransmit_timeout_s,
        )
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.watermarks.follow_forever(), name="watermarks")
            tasks.create_task(self.drops.report_forever(), name="drop-reports")

    async def _wait_for_streams(self, js: JetStreamContext) -> None:
        """Wait until the streams this bridge uses exist. The cloud owns them: a bridge
        only checks, never creates or updates (see :mod:`broker.protocol.topology`)."""
        needed = [self.topology.records_stream, self.topology.events_stream]
        if self.control is not None:
            needed.append(self.topology.control_stream)
        attempt = 0
        while True:
            try:
                await self.topology.require_streams(js, needed)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                delay = backoff_s(attempt, base_s=0.5, cap_s=5.0)
                log.warning("streams_not_ready", error=f"{type(exc).__name__}: {exc}",
                            retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)

    async def _heartbeat_forever(self) -> None:
        while True:
            try:
                await self.send_heartbeat()
            except asyncio.CancelledError:
                raise
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
        for name in self.buffer.stream_names():
            s = self.buffer.stream_state(name)
            if s is None:
                continue
            oldest = await self.buffer.oldest_received(name)
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
        log.debug("heartbeat_sent", edge=self.edge_id, backlog=beat.unshipped_records)

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
        m.buffer_quarantined.set(self.buffer.quarantined)
        m.buffer_lost_records.set(self.buffer.lost_records)
        m.nats_connected.set(1 if self.nats_connected else 0)
        for stream, reasons in stats.dropped.items():
            for reason, count in reasons.items():
                m.records_dropped.labels(stream, reason).set(count)


async def _wait(event: asyncio.Event) -> None:
    await event.wait()


async def run(
    settings: BridgeSettings,
    nats_settings: NatsSettings,
    *,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
) -> None:
    """Run one bridge until ``stop`` is set."""
    async with Bridge(settings, nats_settings) as bridge:
        await bridge.serve(stop, ready)
