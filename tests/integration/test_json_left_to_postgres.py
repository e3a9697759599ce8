"""The ingest leaves the syntax and UTF-8 of JSON payloads to the ``json`` column's input
(which parses each one anyway) and checks them in Python only when PostgreSQL refuses a
group; what that input takes and the record contract does not is still checked first.
The records stored, the records dead-lettered and their reasons are the same as when
every payload was checked in full first (cloud_ingest.writing, step 3)."""

from __future__ import annotations

import json

import asyncpg
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.protocol.topology import Topology
from broker.protocol.validation import MAX_JSON_DEPTH, json_all_plainly_valid, json_problem
from broker.protocol.wire import CT_JSON, Batch, Record
from cloud_ingest.ingesting import init_connection
from cloud_ingest.writing import GroupWriter
from tests.support.batches import batch_msg, json_batch_msg

EPOCH = 9
TS = 1_700_000_000_000_000
NOT_JSON = [b"{nope", b'"\xff"', b"[1,]"]
"""Refused by the ``json`` column's input itself (syntax, UTF-8)."""
JSON_ONLY_JSON_TAKES = [
    b'{"a": "x\\u0000"}',                                          # jsonb refuses U+0000
    b'"\\ud800"',                                                   # a lone surrogate
    b'{"n": 1e999999}',                                             # beyond numeric
    b'{"n": 1e-99999}',                               # 16,383 digits after the point at most
    b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1),      # past the contract
]
"""Taken by the ``json`` column, refused by the record contract (the views read
payloads as ``jsonb``): checked before the COPY."""


@pytest.fixture
async def conn(migrated_conn: asyncpg.Connection) -> asyncpg.Connection:
    await init_connection(migrated_conn)
    return migrated_conn


def _batch(first: int, payloads: list[bytes]) -> Batch:
    return Batch(1, "e1", "s", EPOCH, first,
                 [Record(TS + i, CT_JSON, p) for i, p in enumerate(payloads)])


async def test_bad_json_left_to_postgres_is_dead_lettered_with_the_validators_reasons(
    conn: asyncpg.Connection,
) -> None:
    """A group whose JSON was not checked: the refused COPY sends it to the validator
    once, each bad payload is dead-lettered with its reason (not PostgreSQL's, not
    found by bisection), and every other record of the group commits."""
    gw = GroupWriter(Topology())
    payloads = [b'{"ok": 1}', *NOT_JSON[:2], b'{"ok": 2}', *NOT_JSON[2:], b"[]"]
    group = [gw.decode(json_batch_msg("e0", "s", EPOCH, 1, 20), validate=False, json_syntax=False),
             gw.decode(batch_msg(_batch(1, payloads)), validate=False, json_syntax=False)]
    gw.validate(group, json_syntax=False)
    assert all(d.bad == {} for d in group), "JSON was checked before PostgreSQL saw it"
    with structlog.testing.capture_logs() as logs:
        result = await gw.write(conn, group)
    assert [e["event"] for e in logs].count("group_checked_after_refusal") == 1
    assert (result.inserted, result.dead_letters) == (20 + 3, len(NOT_JSON))
    letters = await conn.fetch(
        "SELECT seq, reason FROM dead_letters WHERE edge_id = 'e1' ORDER BY seq")
    bad_seqs = [i + 1 for i, p in enumerate(payloads) if p in NOT_JSON]
    assert [r["seq"] for r in letters] == bad_seqs
    assert [r["reason"] for r in letters] == [json_problem(payloads[s - 1]) for s in bad_seqs]
    stored = await conn.fetch(
        "SELECT seq FROM v_records WHERE edge_id = 'e1' ORDER BY seq")
    assert [r["seq"] for r in stored] == [1, 4, 6]
    assert {w[0]: w[3] for w in result.watermarks} == {"e0": 20, "e1": len(payloads)}


async def test_a_good_group_is_written_without_the_python_json_check(
    conn: asyncpg.Connection,
) -> None:
    gw = GroupWriter(Topology())
    group = [gw.decode(json_batch_msg("e1", "s", EPOCH, 1, 50), validate=False, json_syntax=False)]
    gw.validate(group, json_syntax=False)
    with structlog.testing.capture_logs() as logs:
        result = await gw.write(conn, group)
    assert (result.inserted, result.dead_letters) == (50, 0)
    assert not group[0].syntax_checked
    assert "group_checked_after_refusal" not in [e["event"] for e in logs]


async def test_a_group_of_redeliveries_alone_sends_no_copy(
    conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing left to insert (every seq accounted already, as read before the COPY: a
    writer that has not written yet reads first) means no COPY at all."""
    first_writer, gw = GroupWriter(Topology()), GroupWriter(Topology())
    msg = json_batch_msg("e1", "s", EPOCH, 1, 20)
    first = await first_writer.write(
        conn, [first_writer.decode(msg, validate=False, json_syntax=False)])
    copies: list[object] = []
    copy_to_table = type(conn).copy_to_table

    async def counted(self: asyncpg.Connection, *args: object, **kwargs: object) -> str:
        copies.append(args)
        return await copy_to_table(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(type(conn), "copy_to_table", counted)  # counts, then the real COPY
    again = await gw.write(conn, [gw.decode(msg, validate=False, json_syntax=False)])
    assert (first.inserted, again.inserted, copies) == (20, 0, [])


async def test_what_the_json_column_takes_but_the_contract_does_not_is_refused_first(
    conn: asyncpg.Connection,
) -> None:
    """Each of these the ``json`` column would store (and every read through the views,
    which cast to ``jsonb``, would then fail on): each is found before the COPY."""
    for payload in JSON_ONLY_JSON_TAKES:
        assert await conn.fetchval("SELECT convert_from($1, 'UTF8')::json IS NOT NULL",
                                   payload)
    gw = GroupWriter(Topology())
    payloads = [b"1", *JSON_ONLY_JSON_TAKES, b"2"]
    group = [gw.decode(batch_msg(_batch(1, payloads)), validate=False, json_syntax=False)]
    gw.validate(group, json_syntax=False)
    assert group[0].bad == {i: json_problem(p) for i, p in enumerate(payloads)
                            if p in JSON_ONLY_JSON_TAKES}
    with structlog.testing.capture_logs() as logs:
        result = await gw.write(conn, group)
    assert (result.inserted, result.dead_letters) == (2, len(JSON_ONLY_JSON_TAKES))
    assert "group_checked_after_refusal" not in [e["event"] for e in logs]


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=8,
)
_edits = st.lists(st.tuples(st.integers(0, 200), st.sampled_from(
    [b"", b"\\", b'"', b"\\u0000", b"\\ud800", b"\xff", b"\xc3", b"e99999", b"1e-20000",
     b",", b"]", b"{", b"\x00", b"\t", b"-", b"."])), max_size=2)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=_json_values, edits=_edits)
async def test_the_json_column_refuses_what_is_left_to_it_exactly_as_the_validator(
    migrated_conn: asyncpg.Connection, value: object, edits: list[tuple[int, bytes]],
) -> None:
    """The premise of leaving JSON syntax to PostgreSQL: a payload the checks left to
    the ingest pass (``json_all_plainly_valid(..., syntax=False)``) is refused by the
    ``json`` column's input exactly when :func:`json_problem` refuses it."""
    payload = json.dumps(value).encode()
    for where, piece in edits:  # a valid document, damaged (or not) in a couple of places
        at = where % (len(payload) + 1)
        payload = payload[:at] + piece + payload[at + 1:]
    if not json_all_plainly_valid([payload], syntax=False):
        return  # checked in full before the COPY: nothing left to PostgreSQL
    try:
        async with migrated_conn.transaction():
            await migrated_conn.fetchval("SELECT convert_from($1, 'UTF8')::json", payload)
        postgres_takes = True
    except asyncpg.DataError:
        postgres_takes = False
    assert postgres_takes == (json_problem(payload) is None), payload
