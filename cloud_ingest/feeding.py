"""The write side of the commit-ordered feed: one ``feed_commits`` row per transaction
that changes what analytics can see.

A writer calls :func:`record_commit` last in its transaction with the spans of the
rows it inserted (exactly those: a duplicate it left out belongs to the commit that
first wrote it) and the watermarks of the keys it touched. The
row's ``commit_id`` is assigned inside COMMIT by the trigger of migration 006,
under a lock held until the commit is visible, so commit ids follow commit order
(the reasoning is in ``migrations/006_feed.sql``). Readers live in
:mod:`broker.feed`.
"""

from __future__ import annotations

from collections.abc import Sequence

from cloud_ingest.db_errors import Connection
from cloud_ingest.packing import int8_array, text_array
from cloud_ingest.ranges import Span, Watermark

__all__ = ["record_commit"]


async def record_commit(conn: Connection, spans: Sequence[Span],
                        watermarks: Sequence[Watermark], *,
                        received_us: int | None = None,
                        max_record_bytes: int | None = None) -> None:
    """Add this transaction's entry to the feed (nothing when it changed nothing).

    Args:
        spans: the rows inserted, in the order readers get them.
        watermarks: ``(edge, stream, epoch, watermark)`` after this transaction.
        received_us: the ``received_at`` of every row inserted (microseconds since the
            Unix epoch; one per transaction), which lets readers go straight to its
            partition. None when no rows were inserted.
        max_record_bytes: at least the bytes (payload, headers and key as stored) of
            each row inserted: readers whose page cannot reach their byte budget then
            skip summing the rows' sizes (migration 013). None: unknown (they sum).
    """
    if not spans and not watermarks:
        return
    # The arrays packed into one text parameter each (cloud_ingest.packing).
    arrays = (
        text_array([s[0] for s in spans], 2), text_array([s[1] for s in spans], 3),
        int8_array([s[2] for s in spans], 4), int8_array([s[3] for s in spans], 5),
        int8_array([s[4] for s in spans], 6),
        text_array([w[0] for w in watermarks], 7), text_array([w[1] for w in watermarks], 8),
        int8_array([w[2] for w in watermarks], 9), int8_array([w[3] for w in watermarks], 10),
    )
    await conn.execute(
        "INSERT INTO feed_commits (rows, edge_ids, streams, epochs, first_seqs, last_seqs,"
        " wm_edge_ids, wm_streams, wm_epochs, watermarks, received_at, max_record_bytes)"
        f" VALUES ($1, {', '.join(a[0] for a in arrays)},"
        " 'epoch'::timestamptz + $11::int8 * interval '1 microsecond', $12)",
        sum(s[4] - s[3] + 1 for s in spans), *(a[1] for a in arrays), received_us,
        max_record_bytes if spans else None,
    )
