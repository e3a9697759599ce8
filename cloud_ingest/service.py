"""The ingest service: NATS + PostgreSQL pool + worker loops + a health endpoint.

Shape (what ``Ingest.run`` does for ``edgesync ingest``; ``edgesync up`` and the tests
embed the same)::

    async with Ingest(settings, nats_settings) as ingest:
        await ingest.serve(stop)

Start-up waits for NATS and PostgreSQL (retrying with backoff), applies the
schema migrations, creates the streams and durable consumers, then consumes.
"""

from __future__ import annotations

import asyncio
import functools

import structlog
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from broker.protocol.events import CommandStatusReport, DesiredStateReport, DropMarker
from broker.protocol.topology import Topology
from broker.service import Supervisor
from broker.serving import embedded_server
from broker.settings import IngestSettings, NatsSettings
from cloud_ingest.cloud_service import CloudService
from cloud_ingest.command_status import CommandStatusWriter
from cloud_ingest.completeness import drop_marker_writer
from cloud_ingest.db_watching import DatabaseWatch
from cloud_ingest.desired_reports import DesiredReportWriter
from cloud_ingest.direct_delivery import DeliveringClient
from cloud_ingest.events_consuming import EventsConsumer
from cloud_ingest.ingesting import RecordsConsumer, init_connection
from cloud_ingest.maintenance import Maintenance
from cloud_ingest.metrics import IngestMetrics
from cloud_ingest.partitioning import ensure_partitions
from cloud_ingest.reconciling import lost_after_commit_writer
from cloud_ingest.topology_keeping import TopologyKeeper
from cloud_ingest.watermarks import WatermarkPublisher

__all__ = [
    "DRAIN_S",
    "Ingest",
]

log = structlog.get_logger(__name__)

DRAIN_S = 8.0
"""Each shutdown step (finish in-flight groups; publish the last watermarks) gets this long."""


class Ingest(CloudService):
    """One ingest process."""

    kind = "ingest"

    def __init__(self, settings: IngestSettings, nats_settings: NatsSettings) -> None:
        super().__init__(nats_settings, Topology(
            prefix=nats_settings.prefix, replicas=nats_settings.replicas,
            records_max_bytes=nats_settings.records_max_bytes,
            records_max_age_s=nats_settings.records_max_age_s,
            events_max_bytes=nats_settings.events_max_bytes,
            events_max_msgs_per_edge=nats_settings.events_max_msgs_per_edge,
        ))
        self.settings = settings
        self.metrics = IngestMetrics()
        self.consumer: RecordsConsumer | None = None
        self.events: EventsConsumer | None = None
        self.watermarks: WatermarkPublisher | None = None
        self.maintenance: Maintenance | None = None
        self.keeper: TopologyKeeper | None = None
        self.db_watch: DatabaseWatch | None = None

    async def _open(self) -> None:
        self._listen(self.settings.host, self.settings.port)
        pool = await self._open_pool(
            self.settings.postgres_dsn, size=self.settings.pool_size, init=init_connection,
            retry_max_s=self.settings.db_retry_max_s,
        )
        self.db_watch = DatabaseWatch(
            self.settings.postgres_dsn, interval_s=self.settings.db_probe_interval_s,
            timeout_s=self.settings.db_probe_timeout_s, on_change=self._db_answering)
        async with pool.acquire() as conn:
            # Today's partition and the next days' exist before the first write.
            self.metrics.partitions_created.inc(
                len(await ensure_partitions(conn, self.settings.partitions_ahead_days)))
        self.maintenance = Maintenance(
            pool, ahead_days=self.settings.partitions_ahead_days,
            interval_s=self.settings.maintenance_interval_s, metrics=self.metrics)
        # The records consumer's deliveries skip nats-py's per-message path
        # (cloud_ingest.direct_delivery); the connection itself is nats-py's.
        nc = await self._connect_nats("ingest", client=DeliveringClient)
        js = nc.jetstream()
        await self.topology.ensure_all(js)  # the ingest owns the topology
        self.watermarks = WatermarkPublisher(
            nc, self.topology,
            interval_s=self.settings.watermark_interval_s, metrics=self.metrics,
        )
        self.consumer = RecordsConsumer(
            nc=nc, js=js, pool=pool, topology=self.topology, settings=self.settings,
            metrics=self.metrics, on_committed=self.watermarks.note,
            on_repeated=functools.partial(self.watermarks.note, again=True),
        )
        await self.consumer.ensure_consumer()
        self.events = EventsConsumer(
            js=js, pool=pool, topology=self.topology,
            consumer=self.settings.consumer, metrics=self.metrics,
            writers={
                DropMarker: drop_marker_writer(
                    self.watermarks.note, max_keys_per_edge=self.settings.max_keys_per_edge,
                    metrics=self.metrics),
                CommandStatusReport: CommandStatusWriter(self.metrics.registry),
                DesiredStateReport: DesiredReportWriter(self.metrics.registry),
            },
            on_heartbeats=lost_after_commit_writer(
                self.watermarks.note, self.metrics,
                max_keys_per_edge=self.settings.max_keys_per_edge),
        )
        await self.events.ensure_consumer()
        # JetStream may lose all of it later (a store wiped or restored): made again.
        self.keeper = TopologyKeeper(js, self.topology, metrics=self.metrics, consumers=[
            (self.topology.records_stream, self.settings.consumer,
             self.consumer.ensure_consumer),
            (self.topology.events_stream, self.events.durable, self.events.ensure_consumer),
        ])
        self.consumer.on_fetch_failed = self.keeper.suspect
        self.events.on_fetch_failed = self.keeper.suspect
        self.watermarks.on_failed = self.keeper.suspect

    @property
    def ready(self) -> bool:
        return (
            self.is_open
            and self.nats_connected
            and self.consumer is not None
            and self.consumer.db_ok
            and self.keeper is not None
            and self.keeper.ok
            and self.db_watch is not None
            and self.db_watch.answering
        )

    def _db_answering(self, answering: bool) -> None:
        """The watch's verdict, in the metric the consumer's writes also set."""
        self.metrics.db_up.set(
            1 if answering and self.consumer is not None and self.consumer.db_ok else 0)

    def health_app(self) -> FastAPI:
        app = FastAPI(title="edgesync ingest", docs_url=None, redoc_url=None)

        @app.get("/healthz")
        async def healthz() -> dict[str, str]:
            return {"status": "ok"}

        @app.get("/readyz")
        async def readyz() -> Response:
            return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503)

        @app.get("/metrics")
        async def metrics() -> Response:
            return PlainTextResponse(generate_latest(self.metrics.registry),
                                     media_type=CONTENT_TYPE_LATEST)

        return app

    async def serve(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Consume until ``stop`` is set; groups in hand are committed and acked first.

        Raises:
            Exception: the error of the first root task that ended unasked
                (:class:`~broker.errors.RootTaskEnded` if it just returned).
        """
        assert self.consumer is not None and self.events is not None
        assert self.watermarks is not None and self.maintenance is not None
        consumer, events, watermarks = self.consumer, self.events, self.watermarks
        maintenance = self.maintenance
        assert self.keeper is not None and self.db_watch is not None
        keeper, db_watch = self.keeper, self.db_watch
        server = embedded_server(self.health_app())
        async with Supervisor("ingest") as roots:
            consume = roots.start(consumer.consume_forever(), name="consume")
            consume_events = roots.start(events.consume_forever(), name="events")
            roots.start(watermarks.publish_forever(), name="watermarks")
            roots.start(maintenance.run_forever(), name="maintenance")
            roots.start(keeper.keep_forever(), name="topology")
            roots.start(db_watch.watch_forever(), name="db-watch")
            roots.start(server.serve(sockets=[self.listener]), name="health")

            async def shutdown() -> None:
                consumer.begin_shutdown()
                events.begin_shutdown()
                maintenance.begin_shutdown()
                keeper.begin_shutdown()
                db_watch.begin_shutdown()
                server.should_exit = True
                await asyncio.wait([consume, consume_events], timeout=DRAIN_S)
                watermarks.begin_shutdown()  # after the last commit: publish its watermarks
                await asyncio.wait(roots.roots, timeout=DRAIN_S)

            roots.on_shutdown(shutdown)
            log.info("ingest_started", consumer=self.settings.consumer, health_port=self.port)
            if ready is not None:
                ready.set()
            await roots.wait(stop)
