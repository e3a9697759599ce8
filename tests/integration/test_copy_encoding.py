"""The group writer's binary COPY data (cloud_ingest.copy_encoding) stores exactly what
the tuple path (asyncpg's ``copy_records_to_table`` with the ingest's codecs) stores:
rows read back equal the records, for any storable record: JSON or opaque payloads
(empty bytes too), unicode keys and JSON, headers or none (an empty map is none),
timestamps at both ends of the storable range, seqs up to 2^63-1. Any run of rows
COPYs alone (the writer bisects a refused COPY). ``max_record_bytes`` bounds every
row's bytes as the feed's readers count them."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.protocol.validation import record_problem
from broker.protocol.wire import CT_JSON, CT_RAW, MAX_SEQ, MAX_TS_US, MIN_TS_US, Record
from cloud_ingest.copy_encoding import COPY_COLUMNS, PIECES_PER_ROW, CopyRows
from cloud_ingest.ingesting import init_connection
from cloud_ingest.writing import COLUMNS, _row

_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                max_size=20)
_json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | _text
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def _records(draw: st.DrawFn) -> Record:
    ts = draw(st.sampled_from([MIN_TS_US, MAX_TS_US, 0, -1, 1_764_547_200_000_000])
              | st.integers(MIN_TS_US, MAX_TS_US))
    key = draw(st.none() | _text)
    headers = draw(st.none() | st.dictionaries(_text, _text, max_size=3))
    if draw(st.booleans()):
        value = draw(_json_value)
        payload = json.dumps(value, ensure_ascii=draw(st.booleans())).encode()
        return Record(ts, CT_JSON, payload, key, headers)
    return Record(ts, CT_RAW, draw(st.binary(max_size=40)), key, headers)


async def _read(conn: asyncpg.Connection, ref: int) -> list[tuple[object, ...]]:
    rows = await conn.fetch(
        f"SELECT {', '.join(COLUMNS)} FROM records WHERE stream_key = $1 ORDER BY seq", ref)
    return [tuple(r) for r in rows]


@pytest.fixture
async def conn(migrated_conn: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    await init_connection(migrated_conn)
    yield migrated_conn


async def _copy(conn: asyncpg.Connection, data: bytes) -> None:
    async def once() -> AsyncIterator[bytes]:
        yield data

    await conn.copy_to_table("records", source=once(), columns=COPY_COLUMNS,
                             format="binary")


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(_records(), min_size=1, max_size=12),
       first=st.sampled_from([1, 1000, MAX_SEQ - 11]), split=st.data())
async def test_rows_read_back_equal_the_records_and_the_tuple_path(
    conn: asyncpg.Connection, records: list[Record], first: int, split: st.DataObject,
) -> None:
    """Every record as a row: read back, the COPY data's rows equal what the records
    say and what asyncpg's tuple path stored of the same records."""
    assert all(record_problem(r) is None for r in records)  # storable records only
    received_us = time.time_ns() // 1000
    try:
        async with conn.transaction():
            await _compare(conn, records, first, received_us, split)
    except _Undo:  # each example leaves the database as it found it
        pass


async def _compare(conn: asyncpg.Connection, records: list[Record], first: int,
                   received_us: int, split: st.DataObject) -> None:
    ours = await conn.fetchval("SELECT es_stream_key('a', 's', 1)")
    theirs = await conn.fetchval("SELECT es_stream_key('a', 's', 2)")
    rows = CopyRows(received_us)
    # Some rows through add, the rest one by one (the writer's two ways in).
    cut = split.draw(st.integers(0, len(records)))
    rows.add(ours, first, records[:cut])
    for i, rec in enumerate(records[cut:], cut):
        rows.add_one(ours, first + i, rec)
    assert len(rows) == len(records)
    await _copy(conn, rows.data())
    await conn.copy_records_to_table(
        "records", columns=COLUMNS,
        records=[_row(theirs, first + i, r, received_us) for i, r in enumerate(records)])
    got, expected = await _read(conn, ours), await _read(conn, theirs)
    assert [g[:3] + g[4:] for g in got] == [e[:3] + e[4:] for e in expected]
    assert got == [
        (first + i, r.ts, received_us, ours, r.key,
         msgspec.json.encode(r.headers) if r.headers else None,
         r.payload if r.ct == CT_JSON else None,
         None if r.ct == CT_JSON else r.payload)
        for i, r in enumerate(records)]
    # What the feed's readers bound pages by (broker.feed.reading): the commit's bound
    # is at least each row's bytes as stored, so a page it vouches for fits.
    largest = await conn.fetchval(
        "SELECT max(coalesce(octet_length(payload::text), octet_length(payload_raw))"
        "           + coalesce(octet_length(headers::text), 0)"
        "           + coalesce(octet_length(key), 0)) FROM records WHERE stream_key = $1",
        ours)
    assert largest <= rows.max_record_bytes
    raise _Undo


class _Undo(Exception):
    """Rolls an example's transaction back."""


async def test_any_run_of_rows_copies_alone(conn: asyncpg.Connection) -> None:
    """``data(lo, hi)`` is a complete COPY of exactly rows lo..hi-1 (each row is
    PIECES_PER_ROW pieces, whatever its kind)."""
    ref = await conn.fetchval("SELECT es_stream_key('a', 's', 1)")
    records = [
        Record(1, CT_JSON, b'{"a": 1}', "k"),
        Record(2, CT_RAW, b"", None, {"h": "v"}),
        Record(3, CT_JSON, b"[]", None, {"x": "\u00e9"}),
        Record(4, CT_RAW, b"\x00\xff", "k"),
        Record(5, CT_JSON, '"\u00e9"'.encode(), "\u00e9"),
    ]
    rows = CopyRows(time.time_ns() // 1000)
    rows.add(ref, 10, records)
    assert len(rows._pieces) == PIECES_PER_ROW * len(records)
    await _copy(conn, rows.data(1, 4))
    assert [r[0] for r in await _read(conn, ref)] == [11, 12, 13]
    await _copy(conn, rows.data(4, 5))
    await _copy(conn, rows.data(0, 1))
    got = await _read(conn, ref)
    assert [(r[0], r[1]) for r in got] == [(10 + i, i + 1) for i in range(5)]


def test_the_chunks_of_any_size_are_the_data() -> None:
    """Sent in chunks of any number of rows, the bytes are one COPY: header, the rows'
    pieces in order, trailer."""
    rows = CopyRows(1_764_547_200_000_000)
    rows.add(3, 1, [Record(i, CT_JSON, b"%d" % i, "k" if i % 2 else None)
                    for i in range(7)])
    whole = b"PGCOPY\n\xff\r\n\x00" + bytes(8) + b"".join(rows._pieces) + b"\xff\xff"
    assert rows.data() == whole
    for size in (1, 2, 3, 7, 100):
        chunks = list(rows.chunks(rows_per_chunk=size))
        assert len(chunks) == -(-7 // size)
        assert b"".join(chunks) == whole
    assert b"".join(rows.chunks(2, 5, rows_per_chunk=2)) == (
        b"PGCOPY\n\xff\r\n\x00" + bytes(8)
        + b"".join(rows._pieces[2 * PIECES_PER_ROW:5 * PIECES_PER_ROW]) + b"\xff\xff")
