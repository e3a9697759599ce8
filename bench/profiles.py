"""How big each scenario runs: ``full`` (≤ 20 min), ``quick`` (< 2 min), ``smoke`` (tests)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PROFILES", "Profile"]


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    ingest_records: int
    """Records pre-loaded into ES_RECORDS (as shipper-sized batches) and ingested."""
    ceiling_group: int
    """Rows per COPY transaction of the ceiling baseline."""
    naive_records: int
    framework_records: int
    edge_records: int
    """Records through SDK -> bridge -> JetStream in the edge-path scenario."""
    producers: int
    """Producer tasks (each its own SDK client / app) in the edge-path scenarios."""
    sync_records: int
    """Records one thread publishes through the synchronous SDK (edge-path scenario)."""
    publish_wait_records: int
    publish_async_records: int
    latency_rate: float
    """Records per second offered in the latency scenario."""
    latency_warmup_s: float
    latency_seconds: float
    backlog_sizes: tuple[int, int]
    footprint_records: int
    footprint_idle_s: float
    wire_records: int
    fleet_sizes: tuple[int, ...]
    """Simulated edges of each live-fleet run (scenario 7)."""
    fleet_drain_records: int
    """Records pre-loaded for the fan-in and bulk drains."""
    fleet_drain_edges: int
    """Edges (x 2 streams) the fan-in drain's records come from."""
    fleet_drain_batch: int
    """Records per fleet batch (linger-driven: a few records/s per edge)."""
    fleet_rate: float
    """Records/s the live fleet offers in all, however many edges."""
    fleet_load_s: float
    fleet_idle_s: float
    fleet_commands: int
    consume_records: int
    """Records committed, then consumed by the SDK and the COPY ceiling (scenario 8)."""
    consume_naive_records: int
    """Records the naive polling loop reads (it slows down as the table grows)."""
    console_edges: int = 10_000
    """Edges in the console scenario's fleet (scenario 9)."""
    console_requests: int = 30
    """Timed requests per fleet view in the console scenario."""
    console_paints: int = 5
    """Cold page loads in Chromium for the console's first paint."""


PROFILES: dict[str, Profile] = {
    "full": Profile(
        name="full", ingest_records=1_000_000, ceiling_group=10_000, naive_records=20_000,
        framework_records=200_000, edge_records=1_000_000, producers=4, sync_records=300_000,
        publish_wait_records=20_000, publish_async_records=300_000, latency_rate=10_000,
        latency_warmup_s=3, latency_seconds=20, backlog_sizes=(200_000, 2_000_000),
        footprint_records=300_000, footprint_idle_s=20, wire_records=50_000,
        fleet_sizes=(1_000, 10_000), fleet_drain_records=400_000, fleet_drain_edges=2_000,
        fleet_drain_batch=10, fleet_rate=10_000, fleet_load_s=20, fleet_idle_s=30,
        fleet_commands=50, consume_records=500_000, consume_naive_records=50_000,
    ),
    "quick": Profile(
        name="quick", ingest_records=100_000, ceiling_group=10_000, naive_records=4_000,
        framework_records=30_000, edge_records=100_000, producers=4, sync_records=50_000,
        publish_wait_records=3_000, publish_async_records=50_000, latency_rate=10_000,
        latency_warmup_s=2, latency_seconds=6, backlog_sizes=(20_000, 200_000),
        footprint_records=50_000, footprint_idle_s=10, wire_records=20_000,
        fleet_sizes=(200,), fleet_drain_records=100_000, fleet_drain_edges=2_000,
        fleet_drain_batch=10, fleet_rate=5_000, fleet_load_s=8, fleet_idle_s=10,
        fleet_commands=20, consume_records=100_000, consume_naive_records=20_000,
    ),
    "smoke": Profile(
        name="smoke", ingest_records=6_000, ceiling_group=2_000, naive_records=300,
        framework_records=1_000, edge_records=4_000, producers=2, sync_records=2_000,
        publish_wait_records=200, publish_async_records=2_000, latency_rate=2_000,
        latency_warmup_s=0.5, latency_seconds=1.0, backlog_sizes=(2_000, 6_000),
        footprint_records=3_000, footprint_idle_s=0.5, wire_records=4_000,
        fleet_sizes=(20,), fleet_drain_records=3_000, fleet_drain_edges=50,
        fleet_drain_batch=10, fleet_rate=1_000, fleet_load_s=2, fleet_idle_s=2,
        fleet_commands=3, consume_records=3_000, consume_naive_records=1_000,
        console_edges=200, console_requests=3, console_paints=1,
    ),
}
