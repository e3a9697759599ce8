"""Reconciling the cloud with the edges' trim floors: what was lost after commit.

An edge deletes a record only once the cloud's committed watermark covers it,
and reports per ``(stream, epoch)`` its **trim floor** in every heartbeat:
every seq up to it was committed in PostgreSQL (or accounted for) at some point.
If PostgreSQL no longer holds some of them — it was restored from an older
backup, a table was truncated — nobody can ship them again, and without this
module the watermark would stop below the hole forever: the edge keeps every
newer record, its buffer fills and its producers stall.

On each heartbeat the seqs at or below the floor that ``committed_ranges``
does not account for are added to ``committed_ranges.lost_after_commit``. They
are *not* re-labelled committed: they count toward the watermark, so the stream
moves on, and they show up in ``v_completeness.lost_after_commit_records``, in
``edgesync status --gaps``, in the ``edgesync_records_lost_after_commit_total``
counter and as a ``records_lost_after_commit`` error log line, for an operator
to alert on.

The check costs one index lookup per stream per heartbeat and locks nothing
unless a gap is found: the rows to update are then locked in key order (as
:func:`cloud_ingest.ranges.merge_ranges` does) and the gap recomputed under the
lock, so a commit racing the heartbeat is never counted as lost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from broker.protocol.events import Heartbeat
from cloud_ingest.db_errors import Connection
from cloud_ingest.events_consuming import AfterCommit
from cloud_ingest.key_limits import keys_over_limit
from cloud_ingest.metrics import IngestMetrics
from cloud_ingest.ranges import Watermark, accounted

__all__ = [
    "Floor",
    "Lost",
    "lost_after_commit_writer",
    "record_lost_after_commit",
    "report_lost",
]

log = structlog.get_logger(__name__)

Floor = tuple[str, str, int, int]
"""``(edge, stream, epoch, trim_floor)``."""

_FLOORS = ("unnest($1::text[], $2::text[], $3::int8[], $4::int8[]) "
           "AS u(edge_id, stream, epoch, floor)")

_UNACCOUNTED = f"""
SELECT u.edge_id, u.stream, u.epoch, u.floor FROM {_FLOORS}
LEFT JOIN committed_ranges c USING (edge_id, stream, epoch)
WHERE c.edge_id IS NULL OR NOT {accounted("c")} @> int8range(1, u.floor + 1)
"""

_CREATE_MISSING_ROWS = f"""
INSERT INTO committed_ranges (edge_id, stream, epoch, ranges)
SELECT edge_id, stream, epoch, '{{}}' FROM {_FLOORS}
ORDER BY edge_id, stream, epoch
ON CONFLICT (edge_id, stream, epoch) DO NOTHING
"""

_ADD_LOST = f"""
WITH gap AS (
    SELECT c.edge_id, c.stream, c.epoch,
           int8multirange(int8range(1, u.floor + 1)) - {accounted("c")} AS lost
    FROM committed_ranges c JOIN {_FLOORS} USING (edge_id, stream, epoch)
    ORDER BY c.edge_id, c.stream, c.epoch
    FOR UPDATE OF c
)
UPDATE committed_ranges c
SET lost_after_commit = c.lost_after_commit + gap.lost, updated_at = now()
FROM gap
WHERE (c.edge_id, c.stream, c.epoch) = (gap.edge_id, gap.stream, gap.epoch)
  AND gap.lost <> '{{}}'::int8multirange
RETURNING c.edge_id, c.stream, c.epoch, gap.lost, es_count(gap.lost) AS count,
          es_watermark({accounted("c")}) AS watermark
"""


@dataclass(frozen=True, slots=True)
class Lost:
    """Seqs of one ``(edge, stream, epoch)`` newly recorded as lost after commit."""

    edge: str
    stream: str
    epoch: int
    count: int
    ranges: list[tuple[int, int]]
    """Closed ``(first, last)`` runs."""
    watermark: int
    """The watermark once they count as accounted."""


def _columns(floors: list[Floor]) -> list[list[Any]]:
    return [[f[i] for f in floors] for i in range(4)]


async def record_lost_after_commit(conn: Connection, floors: list[Floor]) -> list[Lost]:
    """Record as lost after commit every seq at or below an edge's trim floor that
    ``committed_ranges`` does not account for; returns what was added.

    Runs inside the caller's transaction: report the result only once it commits.
    """
    if not floors:
        return []
    candidates = [
        (r["edge_id"], r["stream"], r["epoch"], r["floor"])
        for r in await conn.fetch(_UNACCOUNTED, *_columns(floors))
    ]
    if not candidates:
        return []  # the normal case: every trimmed seq is still accounted for
    candidates.sort()
    await conn.execute(_CREATE_MISSING_ROWS, *_columns(candidates))
    return [
        Lost(r["edge_id"], r["stream"], r["epoch"], r["count"],
             [(x.lower, x.upper - 1) for x in r["lost"]], r["watermark"])
        for r in await conn.fetch(_ADD_LOST, *_columns(candidates))
    ]


def report_lost(lost: list[Lost], metrics: IngestMetrics | None) -> None:
    """Tell the operator: an error log line per key and the counter."""
    for run in lost:
        if metrics is not None:
            metrics.records_lost_after_commit.inc(run.count)
        log.error(
            "records_lost_after_commit", edge=run.edge, stream=run.stream, epoch=run.epoch,
            count=run.count, ranges=[f"{a}-{b}" for a, b in run.ranges[:20]],
            watermark=run.watermark,
        )


def lost_after_commit_writer(
    on_watermarks: Callable[[list[Watermark]], None], metrics: IngestMetrics,
    *, max_keys_per_edge: int | None = None,
) -> Callable[[Connection, list[Any]], Any]:
    """A heartbeat writer for the events consumer: reconciles each stream's trim floor;
    after commit, reports the loss and the watermarks that moved (``on_watermarks``).
    A floor of a new key of an edge that holds ``max_keys_per_edge`` keys is ignored
    (logged, counted: :mod:`cloud_ingest.key_limits`); the heartbeat is stored."""

    async def write(conn: Connection, beats: list[Heartbeat]) -> AfterCommit | None:
        highest: dict[tuple[str, str, int], int] = {}
        for beat in beats:
            for stream, health in beat.streams.items():
                if health.trim_floor > 0:
                    key = (beat.edge, stream, health.epoch)
                    highest[key] = max(highest.get(key, 0), health.trim_floor)
        if highest and max_keys_per_edge is not None:
            for key in sorted(await keys_over_limit(conn, highest, max_keys_per_edge)):
                log.warning("edge_key_limit_reached", edge=key[0], stream=key[1],
                            epoch=key[2], limit=max_keys_per_edge, trim_floor=highest.pop(key))
                metrics.keys_refused.inc()
        lost = await record_lost_after_commit(
            conn, [(*key, floor) for key, floor in sorted(highest.items())]
        )
        if not lost:
            return None

        def after() -> None:
            report_lost(lost, metrics)
            on_watermarks([(r.edge, r.stream, r.epoch, r.watermark) for r in lost])

        return after

    return write
