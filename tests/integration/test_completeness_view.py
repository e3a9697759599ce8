"""v_completeness stays readable whatever one edge claims to have dropped: its drop
markers' counts are summed within bigint (views.sql, migration 014)."""

from __future__ import annotations

from broker.pg_connecting import connected
from cloud_ingest.schema import migrate

BIG = 2**62


async def test_dropped_counts_too_large_to_sum_do_not_break_the_view(pg_dsn: str) -> None:
    """Markers stored before the decoder bounded a marker's count by its run (or by an
    older ingest): two of 2^62 each summed past bigint, and every read of the view
    failed. The sum is held at bigint's largest value; the other edges' rows read."""
    async with connected(pg_dsn) as conn:
        await migrate(conn)
        await conn.execute(
            "INSERT INTO committed_ranges (edge_id, stream, epoch, ranges) VALUES "
            "('edge-1', 's', 7, '{[1,11)}'), ('edge-2', 's', 7, '{[1,4)}')")
        await conn.executemany(
            "INSERT INTO drop_markers (edge_id, stream, epoch, first_seq, last_seq, count, "
            "reason, dropped_at) VALUES ($1, 's', 7, $2, $3, $4, 'overflow', now())",
            [("edge-1", 11, BIG, BIG), ("edge-1", 12, BIG + 1, BIG), ("edge-2", 4, 5, 2)])
        rows = {r["edge_id"]: r["dropped_overflow"] for r in await conn.fetch(
            "SELECT edge_id, dropped_overflow FROM v_completeness")}
    assert rows == {"edge-1": 2**63 - 1, "edge-2": 2}
