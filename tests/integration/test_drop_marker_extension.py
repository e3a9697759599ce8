"""A drop run the edge extends while it is pending reaches the cloud as one marker."""

from __future__ import annotations

import asyncpg

from broker.protocol.events import DropMarker
from cloud_ingest.completeness import drop_marker_writer


def marker(last_seq: int, count: int, reason: str = "overflow") -> DropMarker:
    return DropMarker(edge="e", stream="s", epoch=7, first_seq=1, last_seq=last_seq,
                      count=count, reason=reason, dropped_at=1_700_000_000.0)


async def written(conn: asyncpg.Connection, *markers: DropMarker
                  ) -> tuple[asyncpg.Record, asyncpg.Record]:
    """Each of ``markers`` written in its own transaction, as the events consumer does;
    then the stored marker and the stream's completeness."""
    write = drop_marker_writer(lambda _: None)
    for m in markers:
        async with conn.transaction():
            await write(conn, [m])
    row = await conn.fetchrow(
        "SELECT last_seq, count, reason FROM drop_markers WHERE edge_id='e' AND stream='s'")
    done = await conn.fetchrow(
        "SELECT dropped_overflow, watermark FROM v_completeness "
        "WHERE edge_id='e' AND stream='s' AND epoch=7")
    assert row is not None and done is not None
    return row, done


async def test_an_extended_drop_run_replaces_the_shorter_marker_and_a_late_copy_does_not(
    migrated_conn: asyncpg.Connection,
) -> None:
    """The edge keeps one run per gap and extends it while drops continue: a marker
    with the same first seq and a higher last seq replaces the shorter one (the count
    in v_completeness is every dropped record), a late copy of the shorter one changes
    nothing, and the watermark passes the whole run."""
    row, done = await written(migrated_conn, marker(100, 100), marker(2_000, 2_000),
                              marker(100, 100))
    assert (row["last_seq"], row["count"]) == (2_000, 2_000)
    assert (done["dropped_overflow"], done["watermark"]) == (2_000, 2_000)


async def test_a_longer_run_of_another_reason_does_not_relabel_the_stored_marker(
    migrated_conn: asyncpg.Connection,
) -> None:
    """An overflow run 1..100 is stored; a ``damaged`` run 1..150 with the same first
    seq (a salvage after it) must not turn those drops into damage nor the damage into
    overflow: the stored marker stays as it was, and the watermark passes both."""
    row, done = await written(migrated_conn, marker(100, 100), marker(150, 150, "damaged"))
    assert (row["last_seq"], row["count"], row["reason"]) == (100, 100, "overflow")
    assert (done["dropped_overflow"], done["watermark"]) == (100, 150)
