"""Prometheus metrics of the cloud's processes (the ingest; the operator API and its
rollouts), each in a registry of its own: every metric the cloud exports."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ApiMetrics", "IngestMetrics", "RolloutMetrics"]


class IngestMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.records_committed = Counter(
            "edgesync_records_committed", "Rows inserted into records.", registry=r
        )
        self.duplicate_records = Counter(
            "edgesync_duplicate_records",
            "Records received again and skipped (already committed).", registry=r,
        )
        self.batches_committed = Counter(
            "edgesync_batches_committed", "Batches committed (including all-duplicate ones).",
            registry=r,
        )
        self.dead_letters = Counter(
            "edgesync_dead_letters", "Messages written to dead_letters.", registry=r
        )
        self.dead_lettered_records = Counter(
            "edgesync_dead_lettered_records",
            "Records whose seq was dead-lettered (invalid, or refused by PostgreSQL).",
            registry=r,
        )
        self.group_contentions = Counter(
            "edgesync_ingest_group_contentions",
            "Group writes that other transactions were in the way of (a deadlock, a "
            "serialization failure, a lock not granted within lock_timeout; retried with "
            "backoff) or that outlasted statement_timeout (split in halves); never counted "
            "against the group.",
            registry=r,
        )
        self.group_failures = Counter(
            "edgesync_ingest_group_failures",
            "Unexpected failures writing a group (not outages), by exception type; each is "
            "retried, then narrowed down to the message and dead-lettered.",
            ["error"], registry=r,
        )
        self.commit_seconds = Histogram(
            "edgesync_ingest_commit_seconds", "Time to write and commit one fetched group.",
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.records_lost_after_commit = Counter(
            "edgesync_records_lost_after_commit",
            "Seqs the cloud had committed (the edge trimmed them) and no longer holds, "
            "e.g. after a database restore; alert on any increase.", registry=r,
        )
        self.heartbeats = Counter(
            "edgesync_heartbeats", "Edge heartbeats recorded.", registry=r
        )
        self.partitions_created = Counter(
            "edgesync_records_partitions_created",
            "Day partitions of records created (ahead of time, or late by a writer).",
            registry=r,
        )
        self.partitions_dropped = Counter(
            "edgesync_records_partitions_dropped",
            "Day partitions of records dropped by retention.", registry=r,
        )
        self.records_retired = Counter(
            "edgesync_records_retired",
            "Rows removed by retention (accounted in committed_ranges.retired).", registry=r,
        )
        self.maintenance_failures = Counter(
            "edgesync_records_maintenance_failures",
            "Rounds of partition upkeep / retention that failed (retried next round).",
            registry=r,
        )
        self.db_up = Gauge("edgesync_ingest_db_up", "1 while PostgreSQL accepts writes.",
                           registry=r)
        self.db_up.set(1)
        self.watermark_writes = Counter(
            "edgesync_ingest_watermark_writes",
            "Committed-watermark writes to the KV bucket that JetStream acknowledged (at "
            "most one per key per window: the rate edges learn of commits at).", registry=r,
        )
        self.keys_refused = Counter(
            "edgesync_ingest_keys_refused",
            "Batches, drop markers and trim floors refused because they named a new "
            "(stream, epoch) key of an edge that holds ingest.max_keys_per_edge keys "
            "already (a misbehaving or compromised edge; each batch is a dead letter).",
            registry=r,
        )
        self.watermark_write_failures = Counter(
            "edgesync_ingest_watermark_write_failures",
            "Watermark writes refused or unanswered; each is kept and written again in "
            "the next window (a steady rise: JetStream is refusing the bucket's writes).",
            registry=r,
        )
        self.watermark_keys_pending = Gauge(
            "edgesync_ingest_watermark_keys_pending",
            "Keys whose newer watermark waits for the next window.", registry=r,
        )
        self.topology_repairs = Counter(
            "edgesync_ingest_topology_repairs",
            "Times the ingest found streams, KV buckets or its consumers missing in "
            "JetStream while running (store wiped or restored) and created them again.",
            registry=r,
        )


class ApiMetrics:
    """The operator API's metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.issued = Counter("edgesync_commands_issued", "Commands issued, by kind.", ["kind"],
                              registry=r)
        self.expired = Counter("edgesync_commands_expired",
                               "Commands the cloud marked expired (never delivered).", registry=r)
        self.publish_failures = Counter(
            "edgesync_command_publish_failures", "Failed publishes of commands (retried).",
            registry=r)
        self.unpublished = Gauge(
            "edgesync_commands_unpublished", "Pending commands not yet in JetStream.", registry=r)
        self.live_tails = Gauge(
            "edgesync_api_live_tails", "Open live tails (SSE); capped by api.max_live_tails.",
            registry=r)
        self.tails_refused = Counter(
            "edgesync_api_live_tails_refused",
            "Live tails refused with 503 because api.max_live_tails were open.", registry=r)
        self.requests = Counter("edgesync_api_requests", "API requests by method, route, status.",
                                ["method", "route", "status"], registry=r)


class RolloutMetrics:
    """Rollouts driven by the API process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.dispatched = Counter("edgesync_rollout_edges_dispatched",
                                  "Edges sent a rollout's desired version.", registry=registry)
        self.rolled_back = Counter("edgesync_rollout_edges_rolled_back",
                                   "Edges sent their previous version by an abort.",
                                   registry=registry)
        self.finished = Counter("edgesync_rollouts_finished", "Rollouts by final state.",
                                ["state"], registry=registry)
        self.active = Gauge("edgesync_rollouts_active", "Rollouts running or paused.",
                            registry=registry)
