"""Completeness accounting on the cloud side: the drops edges report.

A drop marker says "the edge deleted these seqs by policy" (overflow or ttl).
It is stored in ``drop_markers`` and merged into ``committed_ranges.dropped``,
so that (a) the completeness view tells records dropped on purpose from
records missing, and (b) the watermark can pass over a dropped run, which
lets the edge trim what follows it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from broker.errors import InvalidInput
from broker.protocol.events import DropMarker
from cloud_ingest.db_errors import Connection
from cloud_ingest.events_consuming import AfterCommit
from cloud_ingest.feeding import record_commit
from cloud_ingest.key_limits import key_limit_reason, keys_over_limit
from cloud_ingest.metrics import IngestMetrics
from cloud_ingest.ranges import merge_ranges

__all__ = [
    "drop_marker_writer",
]

log = structlog.get_logger(__name__)


def drop_marker_writer(
    on_watermarks: Callable[[list[tuple[str, str, int, int]]], None],
    *, max_keys_per_edge: int | None = None, metrics: IngestMetrics | None = None,
) -> Callable[[Connection, list[Any]], Any]:
    """An event writer for :class:`DropMarker` that reports the new watermarks
    (after commit) to ``on_watermarks``. A marker naming a new key of an edge that
    holds ``max_keys_per_edge`` keys is refused (:mod:`cloud_ingest.key_limits`): the
    events consumer dead-letters it alone."""

    async def write(conn: Connection, markers: list[DropMarker]) -> AfterCommit | None:
        if max_keys_per_edge is not None and (refused := await keys_over_limit(
                conn, [(m.edge, m.stream, m.epoch) for m in markers], max_keys_per_edge)):
            key = min(refused)
            log.warning("edge_key_limit_reached", edge=key[0], stream=key[1], epoch=key[2],
                        limit=max_keys_per_edge)
            if metrics is not None and len(markers) == 1:  # once: when tried alone (write_each)
                metrics.keys_refused.inc()
            raise InvalidInput(key_limit_reason(key, max_keys_per_edge))
        await conn.executemany(
            "INSERT INTO drop_markers (edge_id, stream, epoch, first_seq, last_seq, count, "
            "reason, dropped_at) VALUES ($1, $2, $3, $4, $5, $6, $7, to_timestamp($8)) "
            # An edge extends a drop run that is still pending (same first seq, more
            # records dropped right after it): the longer marker wins, a late copy of
            # a shorter one changes nothing.
            "ON CONFLICT (edge_id, stream, epoch, first_seq) DO UPDATE "
            "SET last_seq=EXCLUDED.last_seq, count=EXCLUDED.count "
            "WHERE EXCLUDED.last_seq > drop_markers.last_seq "
            # ... of the same reason: a run of another reason at the same first seq (a
            # salvage's damage after a policy run) never re-labels what is stored.
            "AND EXCLUDED.reason = drop_markers.reason",
            [(m.edge, m.stream, m.epoch, m.first_seq, m.last_seq, m.count, m.reason,
              m.dropped_at) for m in markers],
        )
        watermarks = await merge_ranges(conn, "dropped", [
            (m.edge, m.stream, m.epoch, m.first_seq, m.last_seq) for m in markers
        ])
        await record_commit(conn, [], watermarks)  # consumers learn the new completeness
        return lambda: on_watermarks(watermarks)

    return write
