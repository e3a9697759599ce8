"""Subjects and JetStream streams: the one place that names them.

| subject                    | stream       | purpose                        |
| -------------------------- | ------------ | ------------------------------ |
| ``<p>.rec.<edge>.<stream>`` | ``ES_RECORDS`` | record batches                 |
| ``<p>.ctl.<edge>``          | ``ES_CONTROL`` | signed commands                |
| ``<p>.evt.<edge>``          | ``ES_EVENTS``  | command status and heartbeats  |

``<p>`` is the configurable prefix (default ``es``).

Two KV buckets: ``<P>_WATERMARKS`` (committed watermarks, key
``<edge>.<stream>.<epoch>``) and ``<P>_DESIRED`` (each edge's newest signed desired
state, key ``<edge>``, history 1: a newer version replaces one still unread, see
:mod:`broker.protocol.desired`).

The cloud owns the topology: only the ingest (or the admin step
``edgesync streams init``) calls :meth:`Topology.ensure_streams` and
:meth:`Topology.ensure_watermark_bucket`, which create the streams and the KV
bucket or update them to the owner's configuration (replicas included). Bridges
and the API call :meth:`Topology.missing_streams` and wait or fail while
anything they need is absent: a client that updated a stream to *its* settings
would, on a 3-node cluster, cut the replicas of every stream to its own value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import structlog
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from broker.errors import TopologyMissing
from broker.protocol.stream_limits import (
    EVENTS_MAX_BYTES,
    EVENTS_MAX_MSGS_PER_EDGE,
    RECORDS_MAX_AGE_S,
    RECORDS_MAX_BYTES,
)
from broker.protocol.tokens import validate_token

__all__ = ["INIT_HINT", "Topology"]

INIT_HINT = "start the ingest or run `edgesync streams init` (the cloud owns the streams)"
"""What to do about a missing stream; every client's message says it."""

log = structlog.get_logger(__name__)

@dataclass(frozen=True, slots=True)
class Topology:
    """Subject and stream names under one prefix."""

    prefix: str = "es"
    records_max_age_s: float = RECORDS_MAX_AGE_S
    """How long JetStream keeps record batches; the edge keeps them until committed anyway."""
    records_max_bytes: int = RECORDS_MAX_BYTES
    """Byte cap of ``ES_RECORDS``; past it the oldest batches are discarded (the edges
    retransmit what was discarded before PostgreSQL committed it)."""
    events_max_bytes: int = EVENTS_MAX_BYTES
    """Byte cap of ``ES_EVENTS`` (:data:`~broker.protocol.stream_limits.EVENTS_MAX_BYTES`)."""
    events_max_msgs_per_edge: int = EVENTS_MAX_MSGS_PER_EDGE
    """Events ``ES_EVENTS`` keeps per edge subject; past it that edge's oldest go."""
    duplicate_window_s: float = 300.0
    """JetStream's ``Nats-Msg-Id`` de-duplication window for record batches."""
    replicas: int = 1
    control_max_consumers: int = 1_000_000
    """Consumers ``ES_CONTROL`` may hold: one durable per edge. Set explicitly because
    nats-server 2.15 gives every stream that does not say otherwise a limit of 1,000
    consumers, which would stop the 1,001st edge from being added."""

    @property
    def records_stream(self) -> str:
        return f"{self.prefix.upper()}_RECORDS"

    @property
    def control_stream(self) -> str:
        return f"{self.prefix.upper()}_CONTROL"

    @property
    def events_stream(self) -> str:
        return f"{self.prefix.upper()}_EVENTS"

    @property
    def watermarks_bucket(self) -> str:
        """KV bucket of committed watermarks, key ``<edge>.<stream>.<epoch>``."""
        return f"{self.prefix.upper()}_WATERMARKS"

    @property
    def desired_bucket(self) -> str:
        """KV bucket of each edge's newest signed desired state, key ``<edge>``."""
        return f"{self.prefix.upper()}_DESIRED"

    def desired_subject(self, edge: str) -> str:
        """The subject of an edge's desired-state key (a put publishes to it; an edge
        subscribes to it for live updates)."""
        return f"$KV.{self.desired_bucket}.{validate_token('edge id', edge)}"

    def watermark_updates_subject(self, edge: str) -> str:
        """Where the KV bucket publishes updates of one edge's keys."""
        return f"$KV.{self.watermarks_bucket}.{validate_token('edge id', edge)}.>"

    def watermark_key(self, edge: str, stream: str, epoch: int) -> str:
        """The watermarks bucket's key of one ``(edge, stream, epoch)``."""
        return f"{edge}.{stream}.{epoch}"

    def watermark_subject(self, edge: str, stream: str, epoch: int) -> str:
        """The subject a put of that key publishes to (and its watchers receive)."""
        return f"$KV.{self.watermarks_bucket}.{edge}.{stream}.{epoch}"

    def parse_watermark_subject(self, subject: str) -> tuple[str, str, int] | None:
        """``(edge, stream, epoch)`` of a watermark key's subject, or None if it is not one."""
        parts = subject.split(".")
        if len(parts) != 5 or parts[:2] != ["$KV", self.watermarks_bucket]:
            return None
        try:
            return parts[2], parts[3], int(parts[4])
        except ValueError:
            return None

    def records_subject(self, edge: str, stream: str) -> str:
        validate_token("edge id", edge)
        validate_token("stream name", stream)
        return f"{self.prefix}.rec.{edge}.{stream}"

    def control_subject(self, edge: str) -> str:
        return f"{self.prefix}.ctl.{validate_token('edge id', edge)}"

    def events_subject(self, edge: str) -> str:
        return f"{self.prefix}.evt.{validate_token('edge id', edge)}"

    @property
    def records_wildcard(self) -> str:
        return f"{self.prefix}.rec.>"

    @property
    def events_wildcard(self) -> str:
        return f"{self.prefix}.evt.>"

    def parse_records_subject(self, subject: str) -> tuple[str, str] | None:
        """``(edge, stream)`` of a records subject, or None if it is not one."""
        parts = subject.split(".")
        if len(parts) != 4 or parts[0] != self.prefix or parts[1] != "rec":
            return None
        return parts[2], parts[3]

    def stream_configs(self) -> list[StreamConfig]:
        return [
            self._stream(self.records_stream, self.records_wildcard,
                         max_age_s=self.records_max_age_s, max_bytes=self.records_max_bytes),
            self._stream(self.control_stream, f"{self.prefix}.ctl.>",
                         max_age_s=30 * 24 * 3600.0, max_consumers=self.control_max_consumers),
            self._stream(self.events_stream, self.events_wildcard, max_age_s=7 * 24 * 3600.0,
                         max_bytes=self.events_max_bytes,
                         max_msgs_per_subject=self.events_max_msgs_per_edge),
        ]

    def _stream(self, name: str, subjects: str, *, max_age_s: float,
                max_bytes: int | None = None, max_consumers: int | None = None,
                max_msgs_per_subject: int = -1) -> StreamConfig:
        """What every edgesync stream shares: limits retention, on file, the oldest
        discarded first, the ``Nats-Msg-Id`` window and the replicas."""
        return StreamConfig(
            name=name,
            subjects=[subjects],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=max_age_s,
            max_bytes=max_bytes,
            duplicate_window=self.duplicate_window_s,
            num_replicas=self.replicas,
            max_consumers=max_consumers,
            max_msgs_per_subject=max_msgs_per_subject,
        )

    def control_durable(self, edge: str) -> str:
        """The durable consumer an edge pulls its commands from (``ctl-<edge>``)."""
        return f"ctl-{validate_token('edge id', edge)}"

    def control_consumer_config(
        self, edge: str, *, durable: str | None = None, ack_wait_s: float = 30.0
    ) -> ConsumerConfig:
        """The edge's control consumer, as the cloud creates it and the bridge expects it."""
        return ConsumerConfig(
            durable_name=durable or self.control_durable(edge),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait_s,
            max_ack_pending=1,  # one at a time: commands apply in the order issued
            max_deliver=-1,
            filter_subject=self.control_subject(edge),
        )

    def watermarks_config(self) -> KeyValueConfig:
        return KeyValueConfig(
            bucket=self.watermarks_bucket,
            history=1,
            storage=StorageType.FILE,
            replicas=self.replicas,
            # An edge reads its keys with direct gets, whose subject names the key, so
            # NATS permissions can confine it to its own keys (broker.protocol.permissions).
            direct=True,
            description="edgesync committed watermarks, key <edge>.<stream>.<epoch>",
        )

    def desired_config(self) -> KeyValueConfig:
        return KeyValueConfig(
            bucket=self.desired_bucket,
            history=1,  # the newest version supersedes any older one still unread
            storage=StorageType.FILE,
            replicas=self.replicas,
            direct=True,  # an edge reads its own key by a direct get (permissions)
            description="edgesync desired state, key <edge>: the newest signed version",
        )

    async def ensure_desired_bucket(self, js: JetStreamContext) -> KeyValue:
        """Create (idempotently) and return the desired-state bucket. Owner only."""
        try:
            return await js.create_key_value(self.desired_config())
        except BadRequestError:
            return await js.key_value(self.desired_bucket)

    async def ensure_watermark_bucket(self, js: JetStreamContext) -> KeyValue:
        """Create (idempotently) and return the watermark bucket. Owner only.

        A bucket made before direct gets were needed is switched over.
        """
        try:
            return await js.create_key_value(self.watermarks_config())
        except BadRequestError:
            # Exists with another configuration (no allow_direct): update that one field.
            info = await js.stream_info(f"KV_{self.watermarks_bucket}")
            if not info.config.allow_direct:
                info.config.allow_direct = True
                await js.update_stream(info.config)
                log.info("watermark_bucket_direct_enabled")
            return await js.key_value(self.watermarks_bucket)

    async def missing_streams(self, js: JetStreamContext, names: list[str]) -> list[str]:
        """Which of the streams ``names`` do not exist; reads, never changes anything.

        Raises:
            Exception: NATS errors other than "not found" (timeouts, no JetStream)
                reach the caller, which retries.
        """
        missing = []
        for name in names:
            try:
                await js.stream_info(name)
            except NotFoundError:
                missing.append(name)
        return missing

    async def require_streams(self, js: JetStreamContext, names: list[str]) -> None:
        """Raises :class:`TopologyMissing` naming each absent stream of ``names``."""
        if missing := await self.missing_streams(js, names):
            raise TopologyMissing(
                f"JetStream stream(s) {', '.join(missing)} missing: {INIT_HINT}", missing=missing
            )

    async def ensure_all(self, js: JetStreamContext) -> KeyValue:
        """The owner's step: the streams and the buckets (watermarks, desired state),
        created or updated to this configuration (idempotent); returns the watermark
        bucket. What the ingest does at start and ``edgesync streams init`` does alone."""
        await self.ensure_streams(js)
        await self.ensure_desired_bucket(js)
        return await self.ensure_watermark_bucket(js)

    async def ensure_streams(self, js: JetStreamContext) -> None:
        """Create the streams, or update them to this configuration; idempotent.

        Owner only (the ingest, ``edgesync streams init``): see the module docstring.
        """
        for config in self.stream_configs():
            try:
                info = await js.stream_info(config.name or "")
                if not _differs(config, info.config):
                    continue
            except NotFoundError:
                try:
                    await js.add_stream(config)
                    log.info("stream_created", stream=config.name)
                    continue
                except BadRequestError:
                    # Created concurrently by another process: fall through to update.
                    pass
            await js.update_stream(config)


def _differs(want: StreamConfig, have: StreamConfig) -> list[str]:
    """Names of the fields ``want`` sets that ``have`` (the server's) does not match."""
    return [
        f.name for f in dataclasses.fields(want)
        if (value := getattr(want, f.name)) is not None and getattr(have, f.name) != value
    ]
