"""Settings for every service, grouped; read from the environment or a config file.

Environment variables are ``EDGESYNC_<GROUP>__<FIELD>`` (for example
``EDGESYNC_BRIDGE__EDGE_ID=site-7``, ``EDGESYNC_NATS__URL=nats://10.0.0.2:4222``).
A TOML/JSON/YAML file is not needed: pass values as environment or build the
models in code (tests and ``edgesync up`` do). Every field states its unit and
why its default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.errors import ConfigError
from broker.protocol.stream_limits import (
    EVENTS_MAX_BYTES,
    EVENTS_MAX_MSGS_PER_EDGE,
    RECORDS_MAX_AGE_S,
    RECORDS_MAX_BYTES,
)
from broker.protocol.tokens import TOKEN_PATTERN, is_valid_token, validate_token
from broker.protocol.wire import MAX_BATCH_BYTES, MAX_BATCH_RECORDS

__all__ = [
    "ApiSettings",
    "BridgeSettings",
    "ControlSettings",
    "IngestSettings",
    "LogSettings",
    "NatsSettings",
    "ProducerToken",
    "Settings",
    "ShipperSettings",
    "StreamPolicy",
    "load_settings",
    "settings_problems",
]


def _token(what: str) -> AfterValidator:
    """A setting that must be one whole NATS subject token (``Field(pattern=...)`` only
    searches: it let ``not.valid`` through, a dot that splits a subject)."""

    def check(value: str) -> str:
        if not is_valid_token(value):
            raise ValueError(f"invalid {what} {value!r}: must match {TOKEN_PATTERN} "
                             "(letters, digits, '_' and '-', 1 to 64 characters)")
        return value

    return AfterValidator(check)


class NatsSettings(BaseModel):
    """Where NATS is and how the subjects are named."""

    url: str = Field("nats://127.0.0.1:4222", description="NATS server URL(s), comma-separated.")
    prefix: Annotated[str, _token("subject prefix")] = Field(
        "es", description="Subject prefix; lets several installs share NATS."
    )
    connect_timeout_s: float = Field(2.0, gt=0, description="Seconds per connection attempt.")
    reconnect_wait_s: float = Field(
        0.5, gt=0, description="Seconds between reconnect attempts; short so outages heal fast."
    )
    publish_timeout_s: float = Field(
        5.0, gt=0, description="Seconds to wait for a JetStream publish ack before retrying."
    )
    replicas: int = Field(1, ge=1, le=5, description="Replicas of the streams we create.")
    records_max_bytes: int = Field(
        RECORDS_MAX_BYTES, ge=1024,
        description="Byte cap of the records stream (ES_RECORDS; 10 GiB); the oldest batches "
        "are discarded past it and the edges retransmit what was not yet committed. Size it "
        "as records/s x bytes/record x the ingest outage to ride out (docs/scaling.md).",
    )
    records_max_age_s: float = Field(
        RECORDS_MAX_AGE_S, gt=0,
        description="Seconds the records stream keeps a batch (1 day); the edge keeps every "
        "record until PostgreSQL commits it, so this only bounds the disk.",
    )
    events_max_bytes: int = Field(
        EVENTS_MAX_BYTES, ge=1024,
        description="Byte cap of the events stream (ES_EVENTS; 10 GiB); the oldest events "
        "are discarded past it. Without it one edge publishing on its own events subject "
        "could fill the JetStream store for every stream.",
    )
    events_max_msgs_per_edge: int = Field(
        EVENTS_MAX_MSGS_PER_EDGE, ge=1,
        description="Events the events stream keeps per edge (50,000: 70 h of 5 s "
        "heartbeats); past it that edge's oldest are discarded, not other edges'.",
    )
    credentials_file: Path | None = Field(
        None, description="This identity's NATS credentials: the nkey seed file `edgesync "
        "edges add` writes (`.nk`), or a user JWT `.creds` file; unset: no identity (only "
        "a server without authorization accepts that).",
    )
    ca_file: Path | None = Field(
        None, description="PEM CA bundle that verifies the server certificate; setting it "
        "turns TLS on (a `tls://` URL without it uses the system trust store).",
    )
    cert_file: Path | None = Field(
        None, description="PEM client certificate, for a server that requires mutual TLS "
        "(`verify: true`); needs `key_file`.",
    )
    key_file: Path | None = Field(
        None, description="PEM private key of `cert_file` (keep it 0600).",
    )

    @model_validator(mode="after")
    def _client_cert_has_key(self) -> NatsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("nats.cert_file and nats.key_file go together: set both or neither")
        return self

    @property
    def tls(self) -> bool:
        """True when the connection must use TLS (a CA, a client certificate or tls://)."""
        return (self.ca_file is not None or self.cert_file is not None
                or any(u.strip().startswith("tls://") for u in self.url.split(",")))


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
        2000, ge=1, le=MAX_BATCH_RECORDS,
        description="Records per batch; ~2k amortises per-message cost. At most the wire's "
        "cap (100,000), which the ingest enforces.",
    )
    batch_max_bytes: int = Field(
        512 * 1024,
        ge=1024,
        le=MAX_BATCH_BYTES // 2,
        description="Payload bytes per batch (under nats-server's 1 MiB default max_payload). "
        "At most half the wire's 16 MiB decoded cap, leaving room for one large record.",
    )
    linger_ms: float = Field(
        10.0, ge=0, description="Milliseconds to wait for a fuller batch; bounds added latency."
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
    max_unconfirmed_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Bytes of records shipped (or in flight) whose commit in Postgres is "
        "not yet confirmed, all streams together; the shipper reads no more until "
        "watermarks pass some. Bounds what one retransmission round ships again "
        "while the ingest is down (else the whole backlog, every round); the "
        "throughput it allows is about this / the commit round trip.",
    )


class ControlSettings(BaseModel):
    """The bridge's side of the control plane: which commands it trusts and allows.

    Off unless ``public_key_file`` is set. Every allow-list is checked before a
    command acts; patterns are shell globs (``prod-*``).
    """

    public_key_file: Path | None = Field(
        None, description="PEM file of the cloud's Ed25519 public key(s) (several during a "
        "rotation); unset: the bridge takes no commands.",
    )
    allowed_kinds: list[str] = Field(
        default_factory=lambda: [
            "deployment.scale", "deployment.set_env", "deployment.set_image",
            "deployment.restart", "configmap.patch", "bridge.configure",
        ],
        description="Command kinds this edge accepts.",
    )
    allowed_namespaces: list[str] = Field(
        default_factory=list,
        description="Namespaces Kubernetes commands may touch (globs); empty: none, so "
        "an edge opts in to remote changes of its cluster.",
    )
    allowed_deployments: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Deployments as 'namespace/name' globs, within allowed namespaces.",
    )
    allowed_configmaps: list[str] = Field(
        default_factory=lambda: ["*"],
        description="ConfigMaps as 'namespace/name' globs, within allowed namespaces.",
    )
    allowed_registries: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Where set_image may pull from: globs over the image's registry/path "
        "as Docker normalises it ('ghcr.io/acme/*', 'docker.io/library/*'); a bare host "
        "('registry.corp') allows everything under it. Default: any; narrow it.",
    )
    max_ttl_s: float = Field(
        7 * 24 * 3600.0, gt=0,
        description="Longest command lifetime (expires_at - issued_at) this edge accepts, "
        "whatever the cloud allowed (7 days, the API's default maximum); longer: rejected.",
    )
    kubeconfig: Path | None = Field(
        None, description="Kubeconfig file; unset: the in-cluster service account."
    )
    kube_context: str | None = Field(None, description="Kubeconfig context (default: current).")
    kube_timeout_s: float = Field(10.0, gt=0, description="Seconds per Kubernetes API request.")
    poll_s: float = Field(
        30.0, gt=0, le=300,
        description="Seconds the bridge's pull request for its next command waits before it "
        "is renewed. A command is delivered at once either way; a longer wait costs NATS "
        "fewer requests (10,000 edges renewing every second are 10,000 requests/s). A "
        "reconnect to NATS renews it at once.",
    )
    conflict_retries: int = Field(
        5, ge=0, le=50, description="Retries of a Kubernetes write that hit 409 Conflict."
    )
    apply_timeout_s: float = Field(
        60.0, gt=0, description="Seconds to keep retrying an unreachable Kubernetes API "
        "before the command is reported failed (never past its expiry).",
    )
    max_clock_skew_s: float = Field(
        300.0, ge=0, description="A command issued further than this in the future (by the "
        "edge's clock) is rejected; tolerates unsynchronised edge clocks.",
    )
    ack_wait_s: float = Field(
        30.0, gt=0, description="Seconds before JetStream redelivers a command the bridge "
        "took but did not finish (it crashed); progress is signalled while applying.",
    )
    durable: Annotated[str, _token("durable consumer name")] | None = Field(
        None, description="Durable consumer name (default ctl-<edge>)."
    )
    desired_recheck_interval_s: float = Field(
        60.0, gt=0, description="Seconds between re-checks of the desired state: drift made "
        "behind the bridge's back (kubectl) is reported within one interval, and a missed "
        "update of the desired-state bucket is read.",
    )
    desired_health_timeout_s: float = Field(
        300.0, gt=0, description="Seconds a new desired revision waits for every Deployment "
        "it names to complete its rollout (updated and available replicas) before it is "
        "reported failed; a rollout counts that edge failed.",
    )
    desired_correct_drift: bool = Field(
        False, description="Re-apply the desired state when a re-check finds drift "
        "(self-heal). Off: drift is reported and left (an operator's quick `edgesync cmd "
        "scale` stands) until the next desired version.",
    )


class ProducerToken(BaseModel):
    """One producer's bearer token at the bridge ingress, and the streams it may write."""

    name: Annotated[str, _token("producer name")] = Field(
        description="Who this is (logs, refusals).")
    token: SecretStr = Field(description="The bearer token (>= 24 characters, ~80 bits).")
    streams: list[str] = Field(
        default_factory=lambda: ["*"], min_length=1,
        description="Stream names (globs) it may publish to; default: all.",
    )


class BridgeSettings(BaseModel):
    """The edge bridge daemon."""

    edge_id: Annotated[str, _token("edge id")] = Field("edge-1", description="This edge's id.")
    host: str = Field("127.0.0.1", description="Ingress bind address; loopback by default. "
                      "Any other address needs producer tokens (or "
                      "allow_anonymous_producers).")
    port: int = Field(8787, ge=0, le=65535, description="Ingress port (0 picks a free one).")
    producer_tokens: list[ProducerToken] = Field(
        default_factory=list, description="Producers allowed to publish, each with its token "
        "and streams (JSON list in the environment); any given: every publish needs one.",
    )
    producer_tokens_file: Path | None = Field(
        None, description="JSON file with more producer tokens (a list like "
        "producer_tokens; keep it 0600, e.g. a mounted Kubernetes Secret). Read at start.",
    )
    allow_anonymous_producers: bool = Field(
        False, description="Let a non-loopback ingress take records without a token (a "
        "trusted network only); loopback needs no token unless tokens are configured.",
    )
    buffer_dir: Path = Field(
        Path(".edgesync/bridge"), description="Directory of the durable on-disk buffer."
    )
    buffer_max_bytes: int = Field(
        1024**3, ge=64 * 1024, description="Byte cap of buffered records (1 GiB)."
    )
    max_streams: int = Field(
        1000, ge=1, le=2500,
        description="Distinct stream names this bridge keeps (each has its epoch and seqs "
        "for good); a record for one more is refused with 422 too_many_streams. Each "
        "stream costs every buffer write, shipper round and heartbeat; a heartbeat "
        "carries ~200-370 bytes per stream and must stay under NATS' 1 MiB message.",
    )
    max_record_bytes: int = Field(
        1024**2, ge=1, le=4 * 1024**2,
        description="Largest accepted record payload (1 MiB); larger is 413. At most 4 MiB, "
        "so a batch stays under the wire's 16 MiB decoded cap.",
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
    shipper: ShipperSettings = Field(
        default_factory=ShipperSettings, description="How batches are packed and published."
    )
    heartbeat_interval_s: float = Field(
        5.0, gt=0, description="Seconds between heartbeats on the events subject."
    )
    sync_mode: Literal["full", "normal"] = Field(
        "full",
        description="SQLite synchronous mode: 'full' fsyncs every group commit (survives "
        "power loss); 'normal' survives process crashes only.",
    )
    control: ControlSettings = Field(
        default_factory=ControlSettings, description="Control commands (off without a key)."
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
    consumer: Annotated[str, _token("durable consumer name")] = Field(
        "ingest", description="Durable consumer shared by all replicas."
    )
    fetch_batch: int = Field(
        8,
        ge=1,
        le=10_000,
        description="Messages (batches) the first fetch of a group asks for; a group then "
        "grows by further fetches while a backlog is waiting, up to the group_max_* "
        "budgets (8 shipper-sized batches already fill group_max_records).",
    )
    group_max_records: int = Field(
        16_000,
        ge=1,
        description="Records per group = per transaction; groups are sized by work, so "
        "a fleet's 10-record batches commit as much per transaction as one edge's "
        "2,000-record batches (16,000 = the 8 shipper batches per transaction measured best).",
    )
    group_max_bytes: int = Field(
        8 * 1024**2,
        ge=1024,
        description="Message bytes per group (as received, compressed or not); bounds "
        "the memory a group holds.",
    )
    group_max_messages: int = Field(
        2_000,
        ge=1,
        le=20_000,
        description="Messages (batches) per group; bounds the acks per transaction, "
        "below the consumer's max_ack_pending (20,000) shared by all workers. Above "
        "group_max_records / 10, so a fleet's 10-record batches fill a group by records "
        "as big batches do (at 1,000 its groups held 10,000 records: 40 transactions "
        "instead of 25 per 400,000 records, measured ~15 % slower fan-in).",
    )
    fetch_timeout_s: float = Field(
        0.02,
        gt=0,
        description="Seconds a group waits to fill when fewer messages are ready; bounds "
        "the latency a trickle of records sees.",
    )
    idle_poll_s: float = Field(
        1.0,
        gt=0,
        le=30,
        description="Seconds an idle worker's pull request waits for the first message "
        "(one message, then the group fills within fetch_timeout_s): an idle ingest asks "
        "JetStream once per this interval per worker instead of every fetch_timeout_s "
        "(shutdown ends the wait at once).",
    )
    ack_wait_s: float = Field(
        30.0, gt=0, description="Seconds before JetStream redelivers an unacked batch."
    )
    workers: int = Field(2, ge=1, le=64, description="Concurrent fetch-commit loops per process.")
    pool_size: int = Field(4, ge=1, description="Postgres connections per process.")
    db_retry_max_s: float = Field(5.0, gt=0, description="Backoff cap while Postgres is down.")
    db_probe_interval_s: float = Field(
        5.0, gt=0, le=300,
        description="How often a connection of its own asks PostgreSQL `SELECT 1`: a database "
        "that hangs rather than refuses turns readiness false within interval + timeout, "
        "not at a write's 60 s command timeout.",
    )
    db_probe_timeout_s: float = Field(
        5.0, gt=0, le=60, description="How long that probe (and its connect) may take.",
    )
    group_budget_bytes: int = Field(
        64 * 1024**2,
        ge=1024**2,
        description="Bytes of decoded batches (bodies plus ~400 B per record) a worker holds "
        "at once; a fetched group beyond it is written in parts. Memory stays near "
        "workers x this, whatever the messages expand to.",
    )
    max_keys_per_edge: int = Field(
        10_000,
        ge=1,
        description="(stream, epoch) keys one edge may make the cloud hold (each a "
        "committed_ranges row and a watermark key, kept for good). A bridge holds at most "
        "2,500 streams and mints an epoch only when its buffer is wiped; past this bound "
        "a batch, drop marker or trim floor naming a new key is refused (dead letter, "
        "log line), so one compromised edge cannot fill PostgreSQL and JetStream. Keys "
        "are never removed: an edge with thousands of streams whose buffer was wiped "
        "several times can reach it (edge_key_limit_reached); raise it for such a fleet.",
    )
    watermark_interval_s: float = Field(
        0.25, gt=0, description="Coalescing window of committed-watermark updates per key."
    )
    partitions_ahead_days: int = Field(
        3,
        ge=1,
        le=60,
        description="Days of records partitions kept created ahead of today (UTC), so a "
        "write never waits for one and a missed round or two of upkeep is harmless.",
    )
    maintenance_interval_s: float = Field(
        3600.0,
        gt=0,
        description="Seconds between rounds of partition upkeep and retention (a day "
        "partition is dropped at the first round after every stream in it expired).",
    )
    host: str = Field("127.0.0.1", description="Health/metrics HTTP bind address.")
    port: int = Field(8788, ge=0, le=65535, description="Health/metrics port (0 = free port).")


class ApiSettings(BaseModel):
    """The operator API (``edgesync api``): commands, edges, their status."""

    host: str = Field("127.0.0.1", description="Bind address; loopback by default.")
    port: int = Field(8789, ge=0, le=65535, description="Port (0 picks a free one).")
    url: str | None = Field(
        None, description="Where clients (the CLI) reach the API; default http://host:port."
    )
    postgres_dsn: str = Field(
        "postgresql://edgesync@127.0.0.1:5432/edgesync", description="PostgreSQL DSN."
    )
    private_key_file: Path | None = Field(
        None, description="PEM Ed25519 private key commands are signed with (required)."
    )
    issuer: str = Field(
        "edgesync-api", min_length=1, max_length=128,
        description="Issuer name written into every command envelope.",
    )
    operator_token: SecretStr | None = Field(
        None, description="Bootstrap admin token (operator `bootstrap`, every scope); unset: "
        "only operators made with `edgesync operators add` get in. If set it must be strong "
        "(>= 24 characters, ~80 bits; the API refuses to start otherwise): an empty value "
        "never means 'anyone'. Unset it once real operators exist.",
    )
    metrics_token: SecretStr | None = Field(
        None, description="A token that may read /metrics only (for a Prometheus scraper); "
        "unset: /metrics needs an operator with the read scope. Same strength rule.",
    )
    max_body_bytes: int = Field(
        1024**2, ge=1024, le=64 * 1024**2,
        description="Largest request body (1 MiB; commands are small); refused with 413 "
        "from Content-Length, or while reading, before it is parsed or authenticated.",
    )
    default_ttl_s: float = Field(
        3600.0, gt=0, description="Seconds a command stays valid when the request gives no TTL."
    )
    min_ttl_s: float = Field(
        1.0, gt=0, description="Shortest TTL accepted: a command must live long enough to "
        "reach an edge that is online (a shorter one could only expire).",
    )
    max_ttl_s: float = Field(
        7 * 24 * 3600.0, gt=0, le=30 * 24 * 3600.0,
        description="Longest TTL accepted; below the control stream's 30-day retention.",
    )
    expiry_interval_s: float = Field(
        1.0, gt=0, description="Seconds between sweeps that mark undelivered commands expired."
    )
    republish_interval_s: float = Field(
        2.0, gt=0, description="Seconds between retries of commands not yet in JetStream."
    )
    edge_offline_after_s: float = Field(
        30.0, gt=0, description="An edge silent for this long is shown offline."
    )
    rollout_interval_s: float = Field(
        1.0, gt=0, description="Seconds between passes of the rollout driver (advances "
        "waves, halts, rolls back); every API process runs it, each rollout is advanced by "
        "one at a time.",
    )
    pool_size: int = Field(4, ge=1, description="Postgres connections.")
    pool_acquire_timeout_s: float = Field(
        10.0, gt=0, description="Longest a request waits for one of the pool's connections "
        "(all busy: PostgreSQL slow or stalled); past it the request is answered 503 "
        "database unavailable with Retry-After, instead of queueing without end.",
    )
    db_retry_max_s: float = Field(5.0, gt=0, description="Backoff cap while Postgres is down.")
    max_live_tails: int = Field(
        100,
        ge=0,
        description="Live tails (SSE, GET /v1/records/tail and the console's /ui/data/tail) "
        "open at once; each holds a PostgreSQL connection of its own for its life, so this "
        "bounds them under the server's max_connections. One more is refused with 503 and "
        "Retry-After (the console's with a message on the page).",
    )
    max_streams_per_operator: int = Field(
        10,
        ge=1,
        description="Live tails (the console's included) and NDJSON streams (GET "
        "/v1/records?format=ndjson) one operator token may have open at once, so that one "
        "client cannot take every tail slot. One more is refused with 429 too_many_streams "
        "and Retry-After.",
    )
    page_max_bytes: int = Field(
        8 * 1024**2, ge=1024, le=1024**3,
        description="Bytes of records (payload, headers and key as stored) in one read "
        "of the feed: a JSON page, each page of an NDJSON stream, each read of a live "
        "tail. A page ends before the record that would pass it (caught_up false; the "
        "client continues from next_cursor as usual); a single larger record comes alone.",
    )


class LogSettings(BaseModel):
    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level; changeable live by a bridge.configure command."
    )
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
    api: ApiSettings = Field(default_factory=ApiSettings)
    log: LogSettings = Field(default_factory=LogSettings)


def load_settings() -> Settings:
    """The settings from the environment (and ``.env``).

    Raises:
        ConfigError: naming every invalid setting, its variable and the value given.
    """
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(settings_problems(exc)) from None


def settings_problems(exc: ValidationError) -> str:
    """One line naming each invalid setting of ``exc``: the field, its environment
    variable, what is wrong and the value given."""
    problems = []
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"])
        variable = "EDGESYNC_" + "__".join(str(part) for part in error["loc"]).upper()
        message = str(error["msg"]).removeprefix("Value error, ")
        given = error.get("input")
        if not isinstance(given, dict) and repr(given) not in message:
            message += f" (given {given!r})"
        problems.append(f"{path} ({variable}): {message}")
    return "invalid settings: " + "; ".join(problems)
