"""The ingest service: NATS + PostgreSQL pool + worker loops + a health endpoint.

Shape (the same ``run()`` the CLI, ``edgesync up`` and the tests embed)::

    async with Ingest(settings, nats_settings) as ingest:
        await ingest.serve(stop)

Start-up waits for NATS and PostgreSQL (retrying with backoff), applies the
schema migrations, creates the streams and durable consumers, then consumes.
"""

from __future__ import annotations

import asyncio
import socket

import asyncpg
import structlog
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from nats.aio.client import Client as NATS
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from broker.connecting import close_nats, connect_with_retry
from broker.errors import ClosedError
from broker.protocol.events import CommandStatus, DropMarker
from broker.protocol.topology import Topology
from broker.serving import embedded_server, listen_tcp
from broker.settings import IngestSettings, NatsSettings
from cloud_ingest.command_status import CommandStatusWriter
from cloud_ingest.completeness import drop_marker_writer
from cloud_ingest.edge_tracking import EdgeTracker
from cloud_ingest.ingesting import RecordsConsumer, init_connection
from cloud_ingest.metrics import IngestMetrics
from cloud_ingest.pooling import close_pool, connect_pool
from cloud_ingest.reconciling import lost_after_commit_writer
from cloud_ingest.schema import migrate
from cloud_ingest.watermarks import WatermarkPublisher, ensure_watermark_bucket

__all__ = ["Ingest", "run"]

log = structlog.get_logger(__name__)


class Ingest:
    """One ingest process."""

    def __init__(self, settings: IngestSettings, nats_settings: NatsSettings) -> None:
        self.settings = settings
        self.nats_settings = nats_settings
        self.topology = Topology(prefix=nats_settings.prefix, replicas=nats_settings.replicas)
        self.metrics = IngestMetrics()
        self._nc: NATS | None = None
        self._pool: asyncpg.Pool | None = None
        self._sock: socket.socket | None = None
        self._state = "new"
        self.consumer: RecordsConsumer | None = None
        self.tracker: EdgeTracker | None = None
        self.watermarks: WatermarkPublisher | None = None

    async def __aenter__(self) -> Ingest:
        if self._state != "new":
            raise ClosedError(f"ingest is {self._state}; an Ingest starts once")
        self._state = "open"
        try:
            self._sock = listen_tcp(self.settings.host, self.settings.port)
            self._pool = await connect_pool(
                self.settings.postgres_dsn, size=self.settings.pool_size, init=init_connection,
                retry_max_s=self.settings.db_retry_max_s,
            )
            async with self._pool.acquire() as conn:
                await migrate(conn)
            self._nc = await connect_with_retry(self.nats_settings, name="edgesync-ingest")
            js = self._nc.jetstream()
            await self.topology.ensure_streams(js)
            self.watermarks = WatermarkPublisher(
                await ensure_watermark_bucket(js, self.topology),
                interval_s=self.settings.watermark_interval_s,
            )
            self.consumer = RecordsConsumer(
                nc=self._nc, js=js, pool=self._pool, topology=self.topology,
                consumer=self.settings.consumer, fetch_batch=self.settings.fetch_batch,
                fetch_timeout_s=self.settings.fetch_timeout_s,
                ack_wait_s=self.settings.ack_wait_s, workers=self.settings.workers,
                db_retry_max_s=self.settings.db_retry_max_s, metrics=self.metrics,
                on_committed=self.watermarks.note,
            )
            await self.consumer.ensure_consumer()
            self.tracker = EdgeTracker(
                js=js, pool=self._pool, topology=self.topology,
                consumer=self.settings.consumer, metrics=self.metrics,
                writers={
                    DropMarker: drop_marker_writer(self.watermarks.note),
                    CommandStatus: CommandStatusWriter(self.metrics.registry),
                },
                on_heartbeats=lost_after_commit_writer(self.watermarks.note, self.metrics),
            )
            await self.tracker.ensure_consumer()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Release NATS, the pool and the socket; idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        if self._nc is not None:
            await close_nats(self._nc)
        if self._pool is not None:
            await close_pool(self._pool)
        if self._sock is not None:
            self._sock.close()
        log.info("ingest_stopped")

    @property
    def port(self) -> int:
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    @property
    def ready(self) -> bool:
        return (
            self._state == "open"
            and self._nc is not None
            and self._nc.is_connected
            and self.consumer is not None
            and self.consumer.db_ok
        )

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
        """Consume until ``stop`` is set; groups in hand are committed and acked first."""
        assert self.consumer is not None and self.tracker is not None and self._sock
        assert self.watermarks is not None
        server = embedded_server(self.health_app())
        roots = [
            asyncio.create_task(self.consumer.consume_forever(), name="consume"),
            asyncio.create_task(self.tracker.track_forever(), name="track-edges"),
            asyncio.create_task(self.watermarks.publish_forever(), name="watermarks"),
            asyncio.create_task(server.serve(sockets=[self._sock]), name="health"),
        ]
        log.info("ingest_started", consumer=self.settings.consumer, health_port=self.port)
        if ready is not None:
            ready.set()
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopper, *roots], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    log.error("ingest_task_failed", task=task.get_name(),
                              error=repr(task.exception()))
        finally:
            stopper.cancel()
            self.consumer.begin_shutdown()
            self.tracker.begin_shutdown()
            server.should_exit = True
            _, pending = await asyncio.wait(roots[:2], timeout=10)
            self.watermarks.begin_shutdown()  # after the last commit: publish its watermarks
            _, pending = await asyncio.wait(roots, timeout=10)
            for task in pending:
                task.cancel()
            await asyncio.gather(*roots, return_exceptions=True)


async def run(
    settings: IngestSettings,
    nats_settings: NatsSettings,
    *,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
) -> None:
    async with Ingest(settings, nats_settings) as ingest:
        await ingest.serve(stop, ready)
