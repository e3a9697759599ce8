"""Retention: how long each stream's records are kept, enforced by dropping whole
day partitions of ``records``, never by deleting rows.

A day partition holds every stream's rows of that day. It is dropped once **every
stream with rows in it** is past its retention (``stream_retention``: a stream's
own setting, else the ``*`` default, else kept forever). So a stream is kept *at
least* as long as asked and at most as long as the longest-kept stream it shares a
day with; the table stays one partition per day whatever the number of streams
(stream names are the edges' to choose: they must not be able to create tables).
The choice against per-stream sub-partitions is argued in ``docs/schema.md``.

Completeness is unaffected: a retired record was committed, and stays so in
``committed_ranges.ranges`` (so the watermark, a redelivery's de-duplication and
the lost-after-commit check still count it). Before a partition is dropped, the
seqs it holds are merged, per ``(edge, stream, epoch)``, into
``committed_ranges.retired`` (``v_completeness.retired_records``) and the partition
into ``retired_partitions``, in one transaction; a crash before the drop merely
repeats that (a union is idempotent).

The feed is trimmed with it: commits whose rows all lay in dropped partitions are
deleted, the last watermark of each key they carried folded into
``feed_baseline`` so the completeness at a cursor stays the same.

One process enforces at a time (a session advisory lock; the others skip a round).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import structlog

from broker.errors import InvalidInput
from broker.protocol.tokens import validate_token
from cloud_ingest.db_errors import Connection
from cloud_ingest.metrics import IngestMetrics
from cloud_ingest.partitioning import Partition, drop_partition, list_partitions

__all__ = [
    "DEFAULT_STREAM",
    "MIN_KEEP",
    "RetentionReport",
    "Retired",
    "enforce_retention",
    "format_keep",
    "parse_keep",
    "retention_settings",
    "set_retention",
]

log = structlog.get_logger(__name__)

DEFAULT_STREAM = "*"
"""The ``stream_retention`` row that applies to streams without one of their own."""
MIN_KEEP = timedelta(hours=1)
"""The shortest retention: partitions a writer may still fill (clocks of several
ingest hosts differ) are never dropped."""
_SKEW = timedelta(hours=1)
"""A partition is only considered this long after its day ended (ingest clock skew)."""
_LOCK_KEY = 7306078180709066098  # 'edgeretn'
_KEEP = re.compile(r"^(\d+)([hdw])$")
_UNIT = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}


def parse_keep(text: str) -> timedelta:
    """``12h``, ``30d`` or ``2w``.

    Raises:
        InvalidInput: another form, or shorter than :data:`MIN_KEEP`.
    """
    m = _KEEP.match(text.strip())
    if m is None:
        raise InvalidInput(f"retention {text!r}: give hours, days or weeks, e.g. 36h, 30d, 2w",
                           code="invalid_retention")
    keep = int(m[1]) * _UNIT[m[2]]
    if keep < MIN_KEEP:
        raise InvalidInput(f"retention {text!r} is shorter than the minimum, 1h",
                           code="invalid_retention")
    return keep


def format_keep(keep: timedelta) -> str:
    """The shortest ``parse_keep`` form of ``keep`` (``30d``, ``36h``)."""
    hours = int(keep.total_seconds()) // 3600
    if hours % (24 * 7) == 0:
        return f"{hours // (24 * 7)}w"
    return f"{hours // 24}d" if hours % 24 == 0 else f"{hours}h"


def _stream(stream: str) -> str:
    return stream if stream == DEFAULT_STREAM else validate_token("stream", stream)


async def set_retention(conn: Connection, stream: str, keep: timedelta | None) -> None:
    """Keep ``stream``'s records for ``keep`` (None: remove its setting). ``*`` sets
    the default of streams without a setting of their own.

    Raises:
        InvalidInput: a stream name that is not a valid token, or ``keep`` below
            :data:`MIN_KEEP`.
    """
    stream = _stream(stream)
    if keep is None:
        await conn.execute("DELETE FROM stream_retention WHERE stream = $1", stream)
    else:
        if keep < MIN_KEEP:
            raise InvalidInput("retention is shorter than the minimum, 1h",
                               code="invalid_retention")
        await conn.execute(
            "INSERT INTO stream_retention (stream, keep) VALUES ($1, $2) ON CONFLICT (stream) "
            "DO UPDATE SET keep = EXCLUDED.keep, updated_at = now()", stream, keep)
    log.info("retention_set", stream=stream, keep=format_keep(keep) if keep else None)


async def retention_settings(conn: Connection) -> dict[str, timedelta]:
    """Stream -> how long its records are kept (``*``: the default)."""
    return {r[0]: r[1] for r in await conn.fetch("SELECT stream, keep FROM stream_retention")}


@dataclass(frozen=True, slots=True)
class Retired:
    """A dropped partition and what it held."""

    partition: str
    rows: int
    keys: int
    streams: tuple[str, ...]


@dataclass(slots=True)
class RetentionReport:
    retired: list[Retired] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    """Partition -> why it stays (only those whose day is over)."""
    feed_commits_trimmed: int = 0
    skipped: bool = False
    """Another process was enforcing retention."""


# The distinct streams of a partition: a skip scan down its index, one probe per
# (edge, stream, epoch) key (migration 010) instead of a read of every row.
_STREAMS = """
WITH RECURSIVE k AS (
    (SELECT stream_key FROM {p} ORDER BY stream_key LIMIT 1)
    UNION ALL
    SELECT n.stream_key FROM k, LATERAL (
        SELECT stream_key FROM {p} WHERE stream_key > k.stream_key
        ORDER BY stream_key LIMIT 1) n
)
SELECT DISTINCT s.stream FROM k JOIN stream_keys s ON s.id = k.stream_key
"""
# The seqs a partition holds as runs per key (gaps and islands).
_RUNS = """
SELECT s.edge_id, s.stream, s.epoch, t.lo, t.hi
FROM (SELECT stream_key, min(seq) AS lo, max(seq) + 1 AS hi
      FROM (SELECT stream_key, seq,
                   seq - row_number() OVER (PARTITION BY stream_key ORDER BY seq) AS g
            FROM {p}) AS t
      GROUP BY stream_key, g) AS t
JOIN stream_keys s ON s.id = t.stream_key
ORDER BY s.edge_id, s.stream, s.epoch, t.lo
"""
_MERGE_RETIRED = """
WITH u AS (
    SELECT edge_id, stream, epoch, range_agg(int8range(lo, hi)) AS r
    FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[])
         AS u(edge_id, stream, epoch, lo, hi)
    GROUP BY edge_id, stream, epoch
), locked AS (
    SELECT c.edge_id, c.stream, c.epoch FROM committed_ranges c
    JOIN u USING (edge_id, stream, epoch)
    ORDER BY c.edge_id, c.stream, c.epoch FOR UPDATE OF c
)
UPDATE committed_ranges c SET retired = c.retired + u.r, updated_at = now()
FROM u JOIN locked USING (edge_id, stream, epoch)
WHERE (c.edge_id, c.stream, c.epoch) = (u.edge_id, u.stream, u.epoch)
"""
_TRIM_FEED = """
WITH gone AS (
    DELETE FROM feed_commits
    WHERE commit_id IS NOT NULL AND coalesce(received_at, committed_at) < $1
    RETURNING commit_id, wm_edge_ids, wm_streams, wm_epochs, watermarks
), folded AS (
    INSERT INTO feed_baseline AS b (edge_id, stream, epoch, watermark, upto)
    SELECT w.edge_id, w.stream, w.epoch, max(w.watermark), max(g.commit_id)
    FROM gone g, unnest(g.wm_edge_ids, g.wm_streams, g.wm_epochs, g.watermarks)
         AS w(edge_id, stream, epoch, watermark)
    GROUP BY 1, 2, 3
    ON CONFLICT (edge_id, stream, epoch) DO UPDATE
    SET watermark = greatest(b.watermark, EXCLUDED.watermark),
        upto = greatest(b.upto, EXCLUDED.upto)
)
SELECT count(*) FROM gone
"""


async def enforce_retention(conn: Connection, *, now: datetime | None = None,
                            metrics: IngestMetrics | None = None) -> RetentionReport:
    """Drop every day partition all of whose streams are past their retention, after
    accounting for its rows; then trim the feed. Runs outside a transaction.

    Args:
        now: the time to judge by (tests pass a later one instead of waiting days).
    """
    report = RetentionReport()
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
        report.skipped = True
        return report
    try:
        now = now or datetime.now(UTC)
        settings = await retention_settings(conn)
        partitions = await list_partitions(conn)
        for p in partitions:
            if p.upper + _SKEW > now:
                continue
            why = await _why_kept(conn, p, settings, now)
            if why:
                report.kept[p.name] = why
                continue
            retired = await _retire(conn, p)
            await drop_partition(conn, p)
            report.retired.append(retired)
            log.info("records_retired", partition=p.name, rows=retired.rows,
                     keys=retired.keys, streams=list(retired.streams))
            if metrics is not None:
                metrics.partitions_dropped.inc()
                metrics.records_retired.inc(retired.rows)
        if report.retired:
            remaining = [p for p in partitions
                         if p.name not in {r.partition for r in report.retired}]
            horizon = min((p.lower for p in remaining), default=now)
            report.feed_commits_trimmed = int(await conn.fetchval(_TRIM_FEED, horizon) or 0)
            log.info("feed_trimmed", before=horizon.isoformat(),
                     commits=report.feed_commits_trimmed)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return report


async def _why_kept(conn: Connection, p: Partition, settings: dict[str, timedelta],
                    now: datetime) -> str | None:
    """Why ``p`` must stay, or None when every stream in it is past its retention."""
    streams = [r[0] for r in await conn.fetch(_STREAMS.format(p=f'"{p.name}"'))]
    for stream in sorted(streams):
        keep = settings.get(stream, settings.get(DEFAULT_STREAM))
        if keep is None:
            return f"stream {stream!r} has no retention (kept forever)"
        if p.upper + keep > now:
            return f"stream {stream!r} keeps {format_keep(keep)}"
    return None


async def _retire(conn: Connection, p: Partition) -> Retired:
    """Account for ``p``'s rows as retired (one transaction, idempotent)."""
    async with conn.transaction():
        runs = await conn.fetch(_RUNS.format(p=f'"{p.name}"'))
        cols = [[r[i] for r in runs] for i in range(5)]
        if runs:
            await conn.execute(_MERGE_RETIRED, *cols)
        rows = sum(r[4] - r[3] for r in runs)
        keys = len({(r[0], r[1], r[2]) for r in runs})
        streams = tuple(sorted({r[1] for r in runs}))
        await conn.execute(
            "INSERT INTO retired_partitions (name, lower_at, upper_at, rows, keys, streams) "
            "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO UPDATE SET "
            "rows = EXCLUDED.rows, keys = EXCLUDED.keys, streams = EXCLUDED.streams, "
            "retired_at = now()", p.name, p.lower, p.upper, rows, keys, list(streams))
    return Retired(p.name, rows, keys, streams)
