"""Settings for every service, grouped; read from the environment or a config file.

Environment variables are ``EDGESYNC_<GROUP>__<FIELD>`` (for example
``EDGESYNC_BRIDGE__EDGE_ID=site-7``, ``EDGESYNC_NATS__URL=nats://10.0.0.2:4222``).
A TOML/JSON/YAML file is not needed: pass values as environment or build the
models in code (tests and ``edgesync up`` do). Every field states its unit and
why its default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.tokens import TOKEN_PATTERN, validate_token

__all__ = [
    "BridgeSettings",
    "IngestSettings",
    "LogSettings",
    "NatsSettings",
    "Settings",
    "ShipperSettings",
    "StreamPolicy",
]


class NatsSettings(BaseModel):
    """Where NATS is and how the subjects are named."""

    url: str = Field("nats://127.0.0.1:4222", description="NATS server URL(s), comma-separated.")
    prefix: str = Field(
        "es", pattern=TOKEN_PATTERN, description="Subject prefix; lets several installs share NATS."
    )
    connect_timeout_s: float = Field(2.0, gt=0, description="Seconds per connection attempt.")
    reconnect_wait_s: float = Field(
        0.5, gt=0, description="Seconds between reconnect attempts; short so outages heal fast."
    )
    publish_timeout_s: float = Field(
        5.0, gt=0, description="Seconds to wait for a JetStream publish ack before retrying."
    )
    replicas: int = Field(1, ge=1, le=5, description="Replicas of the streams we create.")


class StreamPolicy(BaseModel):
    """How the edge buffer treats one stream when it is backlogged or full."""

    overflow: Literal["block", "drop_oldest"] = Field(
        "block",
        description="At the byte cap: 'block' back-pressures producers (HTTP 503); "
        "'drop_oldest' deletes the stream's oldest records and counts them.",
    )
    priority: int = Field(
        0, description="Higher ships first when backlogged; ties ship round-robin."
    )
    ttl_s: float | None = Field(
        None, gt=0, description="Records older than this are dropped (counted), never shipped."
    )


class ShipperSettings(BaseModel):
    """How the bridge packs and publishes batches."""

    batch_max_records: int = Field(
        2000, ge=1, le=100_000, description="Records per batch; ~2k amortises per-message cost."
    )
    batch_max_bytes: int = Field(
        512 * 1024,
        ge=1024,
        description="Payload bytes per batch (under nats-server's 1 MiB default max_payload).",
    )
    linger_ms: float = Field(
        20.0, ge=0, description="Milliseconds to wait for a fuller batch; bounds added latency."
    )
    max_in_flight: int = Field(
        8, ge=1, le=256, description="Batches published but not yet acked; hides the round trip."
    )
    compression: Literal["none", "zstd"] = Field(
        "none", description="Batch body compression; zstd trades CPU for bytes on the wire."
    )
    zstd_level: int = Field(3, ge=1, le=19, description="zstd level when compression is zstd.")
    retry_backoff_max_s: float = Field(
        5.0, gt=0, description="Cap of the exponential backoff after a failed publish."
    )
    retransmit_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Seconds a shipped record may stay uncommitted in Postgres before it "
        "is shipped again (repairs loss between JetStream and Postgres); doubles after "
        "each retransmission without progress.",
    )
    retransmit_backoff_max_s: float = Field(
        600.0, gt=0, description="Cap of the retransmit timeout's doubling."
    )


class BridgeSettings(BaseModel):
    """The edge bridge daemon."""

    edge_id: str = Field("edge-1", pattern=TOKEN_PATTERN, description="This edge's id.")
    host: str = Field("127.0.0.1", description="Ingress bind address; loopback by default.")
    port: int = Field(8787, ge=0, le=65535, description="Ingress port (0 picks a free one).")
    buffer_dir: Path = Field(
        Path(".edgesync/bridge"), description="Directory of the durable on-disk buffer."
    )
    buffer_max_bytes: int = Field(
        1024**3, ge=64 * 1024, description="Byte cap of buffered records (1 GiB)."
    )
    max_record_bytes: int = Field(
        1024**2, ge=1, description="Largest accepted record payload (1 MiB); larger is 413."
    )
    max_request_bytes: int = Field(
        16 * 1024**2, ge=1024, description="Largest accepted ingress request body (16 MiB)."
    )
    default_policy: StreamPolicy = Field(
        default_factory=StreamPolicy, description="Policy of streams not listed in `streams`."
    )
    streams: dict[str, StreamPolicy] = Field(
        default_factory=dict, description="Per-stream policies, by stream name."
    )
    shipper: ShipperSettings = Field(default_factory=ShipperSettings)
    heartbeat_interval_s: float = Field(
        5.0, gt=0, description="Seconds between heartbeats on the events subject."
    )
    sync_mode: Literal["full", "normal"] = Field(
        "full",
        description="SQLite synchronous mode: 'full' fsyncs every group commit (survives "
        "power loss); 'normal' survives process crashes only.",
    )

    @field_validator("streams")
    @classmethod
    def _stream_names_are_tokens(cls, value: dict[str, StreamPolicy]) -> dict[str, StreamPolicy]:
        for name in value:
            validate_token("stream name", name)
        return value

    def policy_for(self, stream: str) -> StreamPolicy:
        return self.streams.get(stream, self.default_policy)


class IngestSettings(BaseModel):
    """The cloud ingest workers."""

    postgres_dsn: str = Field(
        "postgresql://edgesync@127.0.0.1:5432/edgesync", description="PostgreSQL DSN."
    )
    consumer: str = Field(
        "ingest", pattern=TOKEN_PATTERN, description="Durable consumer shared by all replicas."
    )
    fetch_batch: int = Field(
        64, ge=1, le=10_000, description="Messages (batches) per fetch = per transaction."
    )
    fetch_timeout_s: float = Field(
        0.5, gt=0, description="Seconds a fetch waits for messages before returning fewer."
    )
    ack_wait_s: float = Field(
        30.0, gt=0, description="Seconds before JetStream redelivers an unacked batch."
    )
    workers: int = Field(2, ge=1, le=64, description="Concurrent fetch-commit loops per process.")
    pool_size: int = Field(4, ge=1, description="Postgres connections per process.")
    db_retry_max_s: float = Field(5.0, gt=0, description="Backoff cap while Postgres is down.")
    watermark_interval_s: float = Field(
        0.25, gt=0, description="Coalescing window of committed-watermark updates per key."
    )
    host: str = Field("127.0.0.1", description="Health/metrics HTTP bind address.")
    port: int = Field(8788, ge=0, le=65535, description="Health/metrics port (0 = free port).")


class LogSettings(BaseModel):
    level: Literal["debug", "info", "warning", "error"] = Field("info")
    format: Literal["json", "console"] = Field(
        "json", description="'json' for production, 'console' for people at a terminal."
    )


class Settings(BaseSettings):
    """All settings; each service reads the groups it needs."""

    model_config = SettingsConfigDict(
        env_prefix="EDGESYNC_", env_nested_delimiter="__", extra="ignore"
    )

    nats: NatsSettings = Field(default_factory=NatsSettings)
    bridge: BridgeSettings = Field(default_factory=BridgeSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    log: LogSettings = Field(default_factory=LogSettings)
