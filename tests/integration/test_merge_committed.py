"""``merge_committed`` (cloud_ingest.ranges): one statement when every key has exactly
one span (a fleet's group), the general one otherwise; both lock, check and merge
alike. Each case runs through both statements and expects the same rows back."""

from __future__ import annotations

import asyncpg
import pytest

from cloud_ingest import ranges
from cloud_ingest.ranges import Span, merge_committed

A, B, C = ("e1", "s", 1), ("e2", "s", 1), ("e3", "s", 1)


async def _ranges(conn: asyncpg.Connection) -> dict[tuple[str, str, int], str]:
    rows = await conn.fetch(
        "SELECT edge_id, stream, epoch, ranges::text AS r FROM committed_ranges")
    return {(r["edge_id"], r["stream"], r["epoch"]): r["r"] for r in rows}


@pytest.fixture(params=["one-span-each", "any"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which statement a call with one span per key takes: the fast one (the general
    one then must not run), or the general one (forced by an extra key with no span,
    which only locks its row)."""
    if request.param == "one-span-each":
        async def general_must_not_run(*_: object) -> None:
            raise AssertionError("one span per key took the general statement")
        monkeypatch.setattr(ranges, "_merge_any", general_must_not_run)
    return str(request.param)


def _keys(spans: list[Span], path: str) -> list[tuple[str, str, int]]:
    keys = sorted({s[:3] for s in spans})
    return sorted([*keys, C]) if path == "any" else keys


async def test_new_and_known_keys_are_merged_with_their_watermarks(
    migrated_conn: asyncpg.Connection, path: str,
) -> None:
    conn = migrated_conn
    await conn.execute(
        "INSERT INTO committed_ranges (edge_id, stream, epoch, ranges) "
        "VALUES ('e1', 's', 1, '{[1,11)}')")
    spans: list[Span] = [(*B, 1, 5), (*A, 11, 20)]  # e2 is new; given out of order
    async with conn.transaction():
        merged = await merge_committed(conn, _keys(spans, path), spans)
    assert merged is not None
    # A key without spans that had no row gets an empty one (locked), watermark 0.
    assert sorted(merged) == [(*A, 20), (*B, 5), *([(*C, 0)] if path == "any" else [])]
    stored = await _ranges(conn)
    assert stored[A] == "{[1,21)}" and stored[B] == "{[1,6)}"
    assert stored.get(C) == ("{}" if path == "any" else None)


async def test_a_seq_another_commit_accounted_makes_it_none_and_changes_nothing(
    migrated_conn: asyncpg.Connection, path: str,
) -> None:
    conn = migrated_conn
    await conn.execute(
        "INSERT INTO committed_ranges (edge_id, stream, epoch, ranges, dead_lettered) "
        "VALUES ('e1', 's', 1, '{[1,11)}', '{}'), ('e2', 's', 1, '{[1,4)}', '{[4,5)}')")
    before = await _ranges(conn)
    # e2's seq 4 was dead-lettered by another commit: the group raced a redelivery.
    spans: list[Span] = [(*A, 11, 20), (*B, 4, 8)]
    tx = conn.transaction()
    await tx.start()
    try:
        assert await merge_committed(conn, _keys(spans, path), spans) is None
    finally:
        await tx.rollback()  # as the writer does: it undoes the group and redoes it
    assert await _ranges(conn) == before


async def test_no_keys_merge_nothing(migrated_conn: asyncpg.Connection) -> None:
    assert await merge_committed(migrated_conn, [], []) == []
    assert await _ranges(migrated_conn) == {}


async def test_two_spans_of_one_key_take_the_general_statement(
    migrated_conn: asyncpg.Connection,
) -> None:
    spans: list[Span] = [(*A, 1, 3), (*A, 5, 9)]  # seq 4 went to a dead letter, say
    async with migrated_conn.transaction():
        merged = await merge_committed(migrated_conn, [A], spans)
    assert merged == [(*A, 3)]
    assert (await _ranges(migrated_conn))[A] == "{[1,4),[5,10)}"
