"""How big each scenario runs: ``full`` (≤ 20 min), ``quick`` (< 2 min), ``smoke`` (tests).

The sizes are data, in ``profiles.toml`` beside this module (one table per profile);
:class:`Profile` says what each one means. A table with a field this class lacks, or
without one it needs, or with a value of the wrong kind, is refused when the module
loads, with the field's name.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PROFILES", "PROFILES_FILE", "Profile", "load_profiles"]

PROFILES_FILE = Path(__file__).with_name("profiles.toml")


@dataclass(frozen=True, slots=True)
class Profile:
    """The sizes of one run of every scenario; ``profiles.toml`` holds one table of them
    per profile."""

    name: str
    """``full``, ``quick`` or ``smoke``: the table's name."""
    ingest_records: int
    """Records pre-loaded into ES_RECORDS (as shipper-sized batches) and ingested."""
    ceiling_group: int
    """Rows per COPY transaction of the ceiling baseline."""
    naive_records: int
    """Records the naive ingest baseline inserts one by one (scenario 1)."""
    framework_records: int
    """Records the framework ingest baseline (FastStream + executemany) writes."""
    edge_records: int
    """Records through SDK -> bridge -> JetStream in the edge-path scenario."""
    producers: int
    """Producer tasks (each its own SDK client / app) in the edge-path scenarios."""
    sync_records: int
    """Records one thread publishes through the synchronous SDK (edge-path scenario)."""
    publish_wait_records: int
    """Records of the awaited ``js.publish``-per-record baselines (edge-path scenario)."""
    publish_async_records: int
    """Records of the pipelined ``publish_async`` baseline (edge-path scenario)."""
    latency_rate: float
    """Records per second offered in the latency scenario."""
    latency_warmup_s: float
    """Seconds offered before the latency scenario starts measuring."""
    latency_seconds: float
    """Seconds the latency scenario measures (also the consumer latency's run)."""
    backlog_sizes: tuple[int, int]
    """The small and the big backlog of the backlog scenario (scenario 4)."""
    footprint_records: int
    """Records pushed at full speed while the footprint scenario reads peak RSS."""
    footprint_idle_s: float
    """Seconds the bridge idles, heartbeats only, for its idle RSS and CPU."""
    wire_records: int
    """Records encoded per wire-format variant (scenario 6)."""
    fleet_sizes: tuple[int, ...]
    """Simulated edges of each live-fleet run (scenario 7)."""
    fleet_drain_records: int
    """Records pre-loaded for the fan-in and bulk drains."""
    fleet_drain_edges: int
    """Edges (x 2 streams) the fan-in drain's records come from."""
    fleet_drain_batch: int
    """Records per fleet batch (linger-driven: a few records/s per edge)."""
    fleet_drain_pairs: int
    """Bulk and fan-in drains run back to back this many times, in alternating order;
    the fan-in / bulk ratio reported is the median of the pairs' ratios."""
    fleet_rate: float
    """Records/s the live fleet offers in all, however many edges."""
    fleet_load_s: float
    """Seconds the live fleet ships at ``fleet_rate`` for the watermark latency."""
    fleet_idle_s: float
    """Seconds the live fleet idles (heartbeats only) for the idle cloud cost."""
    fleet_commands: int
    """Commands sent, one edge at a time, for the command delivery latency."""
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


def load_profiles(text: str) -> dict[str, Profile]:
    """Every profile of a ``profiles.toml`` text, by name.

    Raises:
        ValueError: an unknown or missing field, or a value of the wrong kind.
    """
    kinds = {f.name: f.type for f in dataclasses.fields(Profile)}
    profiles = {}
    for name, table in tomllib.loads(text).items():
        values: dict[str, Any] = {}
        for field, value in table.items():
            kind = kinds.get(field)
            if kind is None or field == "name":
                raise ValueError(f"profile {name!r}: unknown field {field!r}")
            values[field] = _checked(name, field, str(kind), value)
        try:
            profiles[name] = Profile(name=name, **values)
        except TypeError as exc:
            raise ValueError(f"profile {name!r}: {exc}") from None
    return profiles


def _checked(profile: str, field: str, kind: str, value: Any) -> Any:
    if kind.startswith("tuple"):
        ok = isinstance(value, list) and all(type(v) is int for v in value)
        value = tuple(value) if ok else value
    else:
        ok = type(value) is int or (kind == "float" and type(value) is float)
    if not ok:
        raise ValueError(f"profile {profile!r}: {field} = {value!r} is not of type {kind}")
    return value


PROFILES: dict[str, Profile] = load_profiles(PROFILES_FILE.read_text(encoding="utf-8"))
