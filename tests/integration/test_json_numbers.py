"""JSON numbers: the record validator admits exactly the numbers PostgreSQL's ``jsonb``
input takes (its ``numeric``: at most 131,072 digits before the point, 16,383 after it,
trailing zeros and the exponent counted), checked against a real PostgreSQL.

A number that only the ``json`` column takes (``1e-99999`` underflows to 0.0 in a float
parse) would be stored and then break every query that reads payloads as ``jsonb``:
``v_records``, ``v_feed``."""

from __future__ import annotations

import asyncpg
import pytest

from broker.protocol.validation import json_all_plainly_valid, json_problem

NUMBERS = [
    # the point moved far to the right: digits before it
    b"1" + b"0" * 131071, b"1" + b"0" * 131072, b"-" + b"9" * 140000, b"1" + b"0" * 5000,
    b"1e131071", b"1e131072", b"9.99e131071", b"0.1e131072", b"0.01e131073",
    b"12345e131067", b"12345e131068",
    # ... and to the left: digits after it (trailing zeros count)
    b"0." + b"0" * 16382 + b"1", b"0." + b"0" * 16383 + b"1", b"1." + b"0" * 16383,
    b"1." + b"0" * 16382, b"1e-16383", b"1e-16384", b"12e-16384", b"0.1e-16382",
    b"0.10e-16382", b"1.0e-16383", b"1E-99999", b"1e-0005",
    # zeros: no digits before the point, but the scale still counts
    b"0e-99999", b"0.0e-16384", b"0e-16383", b"0e131080", b"0e999999", b"-0",
    # exponents PostgreSQL refuses whatever the digits
    b"0e1073741823", b"0e1073741822", b"1e-1073741823", b"1e" + b"9" * 40,
    # inside documents, beside strings that look like numbers
    b'[1e-99999]', b'{"a":[0.00000e-16380]}', b'{"a":[0.00000e-16379]}',
    b'{"1e-99999": "1e-99999"}', b'["\\u0000"]', b'[' + b"9" * 5000 + b', "\\u0000"]',
    b'[' + b"9" * 5000 + b', "\\\\u0000"]', b'{"n": 1e999999}', b'[1e400, -1e400]',
    # three-digit exponents on long digit runs: the cheap screen must not miss them
    b"0." + b"0" * 15384 + b"1e-999", b"0." + b"0" * 15383 + b"1e-999",
    b"1" + b"0" * 130072 + b"e999", b"1" + b"0" * 130073 + b"e999",
    # a number beyond float beside a string that is not UTF-8 (with or without NUL)
    b'[1e400, "\xff"]', b'[1e400, "\\u0000\xff"]', b'[' + b"9" * 5000 + b', "\xff"]',
]


async def takes(conn: asyncpg.Connection, payload: bytes, kind: str = "jsonb") -> bool:
    """Whether PostgreSQL's ``kind`` input (jsonb, json) takes ``payload`` (sent as
    bytes, as the ingest sends payloads)."""
    try:
        await conn.fetchval(f"SELECT convert_from($1::bytea, 'UTF8')::{kind} IS NOT NULL",
                            payload)
    except asyncpg.PostgresError:
        return False
    return True


@pytest.mark.parametrize("payload", NUMBERS, ids=lambda p: p[:24].decode("latin-1") + f"~{len(p)}B")
async def test_the_validator_admits_exactly_what_jsonb_takes(
    migrated_conn: asyncpg.Connection, payload: bytes
) -> None:
    jsonb = await takes(migrated_conn, payload)
    problem = json_problem(payload)
    assert (problem is None) == jsonb, (problem, jsonb)
    if problem is not None:
        # The bulk check never passes what the per-payload check refuses (the bridge
        # stores a request on its word) ...
        assert not json_all_plainly_valid([payload])
        assert not json_all_plainly_valid([b"{}", payload, b"[]"])
        # ... nor, with syntax left to PostgreSQL (the ingest), what the json column's
        # own input would take.
        if await takes(migrated_conn, payload, "json"):
            assert not json_all_plainly_valid([payload], syntax=False)


def test_a_refused_number_is_named_with_the_limit_it_passes() -> None:
    assert json_problem(b"[1e-99999]") == (
        "JSON number 1e-99999 has 99999 digits after the point; "
        "PostgreSQL numeric holds 16383")
    assert json_problem(b"1" + b"0" * 131072) == (
        "JSON number 10000000000000000000... has 131073 digits before the point; "
        "PostgreSQL numeric holds 131072")
    assert json_problem(b"0e1073741823") == (
        "JSON number 0e1073741823 has an exponent PostgreSQL numeric refuses")
