"""A drop run the edge extends while it is pending reaches the cloud as one marker."""

from __future__ import annotations

import asyncpg

from broker.protocol.events import DropMarker
from cloud_ingest.completeness import drop_marker_writer


def marker(last_seq: int, count: int) -> DropMarker:
    return DropMarker(edge="e", stream="s", epoch=7, first_seq=1, last_seq=last_seq,
                      count=count, reason="overflow", dropped_at=1_700_000_000.0)


async def test_an_extended_drop_run_replaces_the_shorter_marker_and_a_late_copy_does_not(
    migrated_conn: asyncpg.Connection,
) -> None:
    """The edge keeps one run per gap and extends it while drops continue: a marker
    with the same first seq and a higher last seq replaces the shorter one (the count
    in v_completeness is every dropped record), a late copy of the shorter one changes
    nothing, and the watermark passes the whole run."""
    write = drop_marker_writer(lambda _: None)
    for m in (marker(100, 100), marker(2_000, 2_000), marker(100, 100)):
        async with migrated_conn.transaction():
            await write(migrated_conn, [m])
    row = await migrated_conn.fetchrow(
        "SELECT last_seq, count FROM drop_markers WHERE edge_id='e' AND stream='s'")
    done = await migrated_conn.fetchrow(
        "SELECT dropped_overflow, watermark FROM v_completeness "
        "WHERE edge_id='e' AND stream='s' AND epoch=7")
    assert (row["last_seq"], row["count"]) == (2_000, 2_000)
    assert (done["dropped_overflow"], done["watermark"]) == (2_000, 2_000)
