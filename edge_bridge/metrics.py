"""Prometheus metrics of one edge bridge, in a registry of its own: every metric it exports.

A registry per bridge (not the global one) so that several bridges can live in
one process, as ``edgesync up --edges N`` and the tests run them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["BridgeMetrics", "ControlMetrics", "DesiredStateMetrics", "RuntimeConfigMetrics"]


class BridgeMetrics:
    """Everything an operator would graph about one bridge."""

    def __init__(self, edge_id: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"edge": edge_id}
        r = self.registry
        self.records_accepted = Counter(
            "edgesync_records_accepted", "Records made durable in the buffer.",
            ["stream"], registry=r,
        )
        self.records_shipped = Counter(
            "edgesync_records_shipped", "Records acknowledged by JetStream.",
            ["stream"], registry=r,
        )
        self.batches_shipped = Counter(
            "edgesync_batches_shipped", "Batches acknowledged by JetStream.", registry=r
        )
        self.bytes_shipped = Counter(
            "edgesync_bytes_shipped", "Batch body bytes acknowledged by JetStream.", registry=r
        )
        self.publish_failures = Counter(
            "edgesync_publish_failures", "Failed batch publish attempts (retried).", registry=r
        )
        self.batches_too_large = Counter(
            "edgesync_batches_too_large",
            "Publish attempts held back: the batch is bigger than nats-server's max_payload.",
            registry=r,
        )
        self.retransmissions = Counter(
            "edgesync_retransmissions",
            "Times a stream's uncommitted records were shipped again.", registry=r,
        )
        self.watermarks_ignored = Counter(
            "edgesync_watermarks_ignored",
            "Committed watermarks refused because they claim seqs this bridge never "
            "shipped (reason above_shipped: not shipped yet; beyond_assigned: never "
            "existed). Counted once per value.", ["stream", "reason"], registry=r,
        )
        self.ingress_requests = Counter(
            "edgesync_ingress_requests", "Ingress requests by HTTP status.", ["status"],
            registry=r,
        )
        self.duplicate_requests = Counter(
            "edgesync_ingress_duplicate_requests",
            "Retried producer requests answered from the de-duplication table.", registry=r,
        )
        self.append_seconds = Histogram(
            "edgesync_buffer_append_seconds", "Time from request to durable commit.",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.records_dropped = Gauge(
            "edgesync_records_dropped", "Records dropped by policy since the buffer was created.",
            ["stream", "reason"], registry=r,
        )
        self.buffer_records = Gauge(
            "edgesync_buffer_records", "Records held in the buffer.", registry=r
        )
        self.buffer_unshipped_records = Gauge(
            "edgesync_buffer_unshipped_records", "Records not yet acknowledged by JetStream.",
            registry=r,
        )
        self.buffer_bytes = Gauge(
            "edgesync_buffer_bytes", "Record bytes held in the buffer.", registry=r
        )
        self.buffer_max_bytes = Gauge(
            "edgesync_buffer_max_bytes", "Byte cap of the buffer.", registry=r
        )
        self.buffer_disk_bytes = Gauge(
            "edgesync_buffer_disk_bytes", "Bytes of the buffer's files on disk.", registry=r
        )
        self.oldest_unshipped_age = Gauge(
            "edgesync_oldest_unshipped_age_seconds", "Age of the oldest unshipped record.",
            registry=r,
        )
        self.buffer_commits = Gauge(
            "edgesync_buffer_commits", "Buffer transactions committed (group commits).",
            registry=r,
        )
        self.buffer_quarantined = Gauge(
            "edgesync_buffer_quarantined_files",
            "Damaged buffer files moved to quarantine at start-up.", registry=r,
        )
        self.buffer_lost_records = Gauge(
            "edgesync_buffer_lost_records",
            "Records found in a damaged buffer file but not recoverable.", registry=r,
        )
        self.nats_connected = Gauge(
            "edgesync_nats_connected", "1 while connected to NATS.", registry=r
        )
        self.info = Gauge("edgesync_bridge_info", "Bridge identity.", ["edge"], registry=r)
        self.info.labels(**labels).set(1)


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


class DesiredStateMetrics:
    """What an operator graphs about one edge's desired state."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.passes = Counter("edgesync_desired_passes", "Reconciliation passes by outcome.",
                              ["status"], registry=r)
        self.drift = Gauge("edgesync_desired_drift_fields",
                           "Managed fields whose observed value differs from the desired one.",
                           registry=r)
        self.revision = Gauge("edgesync_desired_revision",
                              "The desired-state revision this edge applied last.", registry=r)
        self.apply_seconds = Histogram(
            "edgesync_desired_apply_seconds", "Applying a new revision, health wait included.",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=r)


class RuntimeConfigMetrics:
    """The settings in effect on one bridge (``bridge.configure`` may change them)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.batch_records = Gauge(
            "edgesync_bridge_config_batch_max_records", "Effective records per batch.",
            registry=r)
        self.batch_bytes = Gauge(
            "edgesync_bridge_config_batch_max_bytes", "Effective payload bytes per batch.",
            registry=r)
        self.linger = Gauge(
            "edgesync_bridge_config_linger_seconds", "Effective batch linger.", registry=r)
        self.compression = Gauge(
            "edgesync_bridge_config_compression", "1 for the batch compression in effect.",
            ["compression"], registry=r)
        self.heartbeat = Gauge(
            "edgesync_bridge_config_heartbeat_interval_seconds",
            "Effective seconds between heartbeats.", registry=r)
        self.priority = Gauge(
            "edgesync_stream_policy_priority",
            "Priority of each stream with its own policy, and of the default policy.",
            ["stream"], registry=r)
        self.ttl = Gauge(
            "edgesync_stream_policy_ttl_seconds", "Record TTL by policy (0: none).",
            ["stream"], registry=r)
        self.overflow = Gauge(
            "edgesync_stream_policy_overflow", "1 for the overflow policy in effect.",
            ["stream", "overflow"], registry=r)
        self.changes = Counter(
            "edgesync_bridge_config_changes", "bridge.configure changes applied.", registry=r)
