"""Merging seq ranges into ``committed_ranges``: what is committed, what was dropped,
what was dead-lettered (and, with :mod:`cloud_ingest.reconciling`, what was lost
after commit).

The one place that writes that table (besides :mod:`cloud_ingest.reconciling`,
which adds what the cloud lost after commit). Both writers run inside the transaction
that stores what the ranges describe, and get back the contiguous watermark of
every key they touched as seen inside that transaction (so it includes every
earlier commit, whatever order parallel workers commit in).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import asyncpg

from cloud_ingest.db_errors import Connection
from cloud_ingest.packing import int8_array, text_array

__all__ = [
    "ACCOUNTED", "Column", "Span", "Watermark", "accounted", "merge_committed", "merge_ranges",
    "spans_of", "watermarks_of",
]

Span = tuple[str, str, int, int, int]
"""``(edge, stream, epoch, first_seq, last_seq)``, closed."""
Watermark = tuple[str, str, int, int]
"""``(edge, stream, epoch, watermark)``."""

Column = Literal["ranges", "dropped", "dead_lettered"]
_COLUMNS: tuple[Column, ...] = ("ranges", "dropped", "dead_lettered")


def accounted(alias: str = "") -> str:
    """SQL for the seqs of a ``committed_ranges`` row that move the watermark: committed,
    dropped by the edge's policy, dead-lettered, or lost after commit. The one home of
    that rule."""
    t = f"{alias}." if alias else ""
    return f"({t}ranges + {t}dropped + {t}dead_lettered + {t}lost_after_commit)"


_AGG = "range_agg(int8range(lo, hi))"
_EMPTY = "'{}'::int8multirange"
ACCOUNTED = accounted()
"""Every seq whose fate is known; the watermark is its contiguous prefix."""


async def merge_ranges(conn: Connection, column: Column, spans: Sequence[Span]) -> list[Watermark]:
    """Add ``spans`` to ``committed_ranges.<column>``; returns the new watermarks."""
    if not spans:
        return []
    # Sorted: concurrent transactions lock the rows in one order, so never deadlock.
    ordered = sorted(spans)
    values = ", ".join(_AGG if c == column else _EMPTY for c in _COLUMNS)
    params = (text_array([s[0] for s in ordered], 1), text_array([s[1] for s in ordered], 2),
              int8_array([s[2] for s in ordered], 3), int8_array([s[3] for s in ordered], 4),
              int8_array([s[4] + 1 for s in ordered], 5))
    rows = await conn.fetch(
        f"INSERT INTO committed_ranges AS c (edge_id, stream, epoch, {', '.join(_COLUMNS)}) "
        f"SELECT edge_id, stream, epoch, {values} "
        f"FROM unnest({', '.join(p[0] for p in params)}) "
        "  AS u(edge_id, stream, epoch, lo, hi) "
        "GROUP BY edge_id, stream, epoch ORDER BY edge_id, stream, epoch "
        "ON CONFLICT (edge_id, stream, epoch) DO UPDATE "
        f"SET {column} = c.{column} + EXCLUDED.{column}, updated_at = now() "
        f"RETURNING edge_id, stream, epoch, es_watermark({ACCOUNTED}) AS watermark",
        *(p[1] for p in params),
    )
    return [(r["edge_id"], r["stream"], r["epoch"], r["watermark"]) for r in rows]


async def merge_committed(conn: Connection, keys: Sequence[tuple[str, str, int]],
                          spans: Sequence[Span]) -> list[Watermark] | None:
    """Add ``spans`` (rows just inserted) to ``committed_ranges.ranges`` unless a
    concurrent commit accounted any of their seqs meanwhile; returns the new
    watermarks, or None when one did (the caller undoes its work: a raced redelivery).

    One statement that locks, checks and merges: every key of ``keys`` (each span's
    key among them) gets its row created when missing and locked, in key order as
    :func:`merge_ranges` and ``accounting.accounted_seqs`` lock them (so never a
    deadlock), whether or not it has spans; ``ON CONFLICT DO UPDATE`` takes each
    existing row's lock and then evaluates its ``WHERE`` on the newest committed
    version of the row, so a commit that raced this transaction is seen, and its
    row is then locked but not updated, hence missing from what the statement
    returns. A fleet's group thus writes each key's row once (a lock, a check and
    an update), where a locking read and then an update wrote it twice. (Two
    statements say it: one for when every key has exactly one span, a fleet's common
    group, and one for any keys and spans.)
    """
    if not keys:
        return []
    ordered = sorted(spans)
    if len(ordered) == len(keys) and all(
            s[:3] == k for s, k in zip(ordered, sorted(keys), strict=True)):
        rows = await _merge_one_span_each(conn, ordered)
    else:
        rows = await _merge_any(conn, keys, ordered)
    out = [(r["edge_id"], r["stream"], r["epoch"], r["watermark"]) for r in rows]
    merged = {w[:3] for w in out}
    if any(s[:3] not in merged for s in ordered):
        return None
    return out


async def _merge_any(conn: Connection, keys: Sequence[tuple[str, str, int]],
                     ordered: Sequence[Span]) -> list[asyncpg.Record]:
    """:func:`merge_committed`'s statement for any ``keys`` and ``ordered`` spans: each
    key's spans joined into one multirange (none: an empty one, the row still locked)."""
    params = (text_array([k[0] for k in keys], 1), text_array([k[1] for k in keys], 2),
              int8_array([k[2] for k in keys], 3),
              text_array([s[0] for s in ordered], 4), text_array([s[1] for s in ordered], 5),
              int8_array([s[2] for s in ordered], 6), int8_array([s[3] for s in ordered], 7),
              int8_array([s[4] + 1 for s in ordered], 8))
    return await conn.fetch(
        "INSERT INTO committed_ranges AS c (edge_id, stream, epoch, ranges) "
        f"SELECT k.edge_id, k.stream, k.epoch, coalesce(s.ranges, {_EMPTY}) "
        f"FROM unnest({', '.join(p[0] for p in params[:3])}) AS k(edge_id, stream, epoch) "
        f"LEFT JOIN (SELECT edge_id, stream, epoch, {_AGG} AS ranges "
        f"  FROM unnest({', '.join(p[0] for p in params[3:])}) "
        "    AS u(edge_id, stream, epoch, lo, hi) GROUP BY edge_id, stream, epoch) s "
        "  USING (edge_id, stream, epoch) "
        "ORDER BY k.edge_id, k.stream, k.epoch "
        "ON CONFLICT (edge_id, stream, epoch) DO UPDATE "
        "SET ranges = c.ranges + EXCLUDED.ranges, updated_at = now() "
        "WHERE NOT isempty(EXCLUDED.ranges) "
        "  AND NOT (c.ranges + c.dead_lettered) && EXCLUDED.ranges "
        f"RETURNING edge_id, stream, epoch, es_watermark({ACCOUNTED}) AS watermark",
        *(p[1] for p in params),
    )


async def _merge_one_span_each(conn: Connection, ordered: Sequence[Span]
                               ) -> list[asyncpg.Record]:
    """:func:`merge_committed`'s statement when every key has exactly one span (a
    fleet's group: each of its batches is the only one of its key, all of it stored):
    each span is its key's multirange as is, with no join of the spans to the keys and
    no aggregate (~25 % less PostgreSQL time for a thousand keys, measured). Locks,
    checks and merges as the general statement does."""
    params = (text_array([s[0] for s in ordered], 1), text_array([s[1] for s in ordered], 2),
              int8_array([s[2] for s in ordered], 3), int8_array([s[3] for s in ordered], 4),
              int8_array([s[4] + 1 for s in ordered], 5))
    return await conn.fetch(
        "INSERT INTO committed_ranges AS c (edge_id, stream, epoch, ranges) "
        "SELECT u.edge_id, u.stream, u.epoch, int8multirange(int8range(u.lo, u.hi)) "
        f"FROM unnest({', '.join(p[0] for p in params)}) "
        "  AS u(edge_id, stream, epoch, lo, hi) "
        "ORDER BY u.edge_id, u.stream, u.epoch "
        "ON CONFLICT (edge_id, stream, epoch) DO UPDATE "
        "SET ranges = c.ranges + EXCLUDED.ranges, updated_at = now() "
        "WHERE NOT (c.ranges + c.dead_lettered) && EXCLUDED.ranges "
        f"RETURNING edge_id, stream, epoch, es_watermark({ACCOUNTED}) AS watermark",
        *(p[1] for p in params),
    )


async def watermarks_of(conn: Connection, keys: Sequence[tuple[str, str, int]]
                        ) -> list[Watermark]:
    """The watermarks of ``keys`` as they stand (keys with no row yet are left out)."""
    if not keys:
        return []
    params = (text_array([k[0] for k in keys], 1), text_array([k[1] for k in keys], 2),
              int8_array([k[2] for k in keys], 3))
    rows = await conn.fetch(
        f"SELECT c.edge_id, c.stream, c.epoch, es_watermark({accounted('c')}) AS watermark "
        f"FROM unnest({', '.join(p[0] for p in params)}) AS u(edge_id, stream, epoch) "
        "JOIN committed_ranges c USING (edge_id, stream, epoch) "
        "ORDER BY c.edge_id, c.stream, c.epoch",
        *(p[1] for p in params),
    )
    return [(r["edge_id"], r["stream"], r["epoch"], r["watermark"]) for r in rows]


def spans_of(edge: str, stream: str, epoch: int, seqs: Sequence[int]) -> list[Span]:
    """Closed spans covering ``seqs`` (sorted ascending), one per contiguous run."""
    spans: list[Span] = []
    start = prev = None
    for seq in seqs:
        if prev is not None and seq == prev + 1:
            prev = seq
            continue
        if start is not None and prev is not None:
            spans.append((edge, stream, epoch, start, prev))
        start = prev = seq
    if start is not None and prev is not None:
        spans.append((edge, stream, epoch, start, prev))
    return spans
