"""The direct path reads a raw header block as nats-py's own parser does: the same dict
for a data delivery's headers, the same ``Status`` for an inline status, and the same
value of one header read without parsing the block (``header_of``)."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cloud_ingest.direct_delivery import (
    DATA_HEADER_LINE,
    Delivery,
    header_of,
    parse_header_block,
    status_of,
)

DATA_BLOCKS = [
    b"NATS/1.0\r\nNats-Msg-Id: e1.s.7.1-10\r\n\r\n",
    b"NATS/1.0\r\nEs-Encoding: zstd\r\nNats-Msg-Id: e1.s.7.1-10.r2\r\n\r\n",
    b"NATS/1.0\r\nA:b\r\nC:\tspaced out  \r\n\r\n",        # no space, a tab, trailing
    b"NATS/1.0\r\nX: 1\r\nX: 2\r\n\r\n",                     # repeated: the last wins
    b"NATS/1.0\r\nBad Name: 1\r\nOk: 2\r\n\r\n",             # whitespace in a name
    b"NATS/1.0\r\nN\xc3\xa4me: 1\r\nOk: 2\r\n\r\n",          # a non-ASCII name
    b"NATS/1.0\r\nV: caf\xc3\xa9 \xff\r\n\r\n",              # UTF-8 and a broken byte
    b"NATS/1.0\r\nUrl: http://x:80/a\r\nEmpty:\r\n\r\n",     # ':' in a value, empty value
    b"NATS/1.0\r\nno colon here\r\nK: v\r\n\r\n",
    b"NATS/1.0\r\n\r\n",                                       # no headers at all
    b"NATS/1.0\r\nNats-Msg-Id:e1.s.7.1-10",                    # no final CRLF
    b"NATS/1.0\r\n Nats-Msg-Id : a\r\n\r\n",                  # spaces around the name
    b"NATS/1.0\r\nX-Nats-Msg-Id: a\r\nNats-Msg-Id: b\r\n\r\n",  # the name in another's
    b"NATS/1.0\r\nK: Nats-Msg-Id: a\r\n\r\n",                # the name in a value only
    b"NATS/1.0\r\nNats-Msg-Id: a\r\nNats-Msg-Id: b\r\n\r\n",   # repeated
    b"NATS/1.0\r\nNats-Msg-Idx: a\r\n\r\n",                  # a longer name
    b"NATS/1.0\r\nNats-Msg-Id: caf\xc3\xa9 \xff\r\n\r\n",      # UTF-8 and a broken byte
]
NAMES = ["Nats-Msg-Id", "Es-Encoding", "X", "Ok", "Empty", "Absent"]

STATUS_BLOCKS = [
    b"NATS/1.0 404 No Messages\r\n\r\n",
    b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 3\r\n\r\n",
    b"NATS/1.0 409 Exceeded MaxWaiting\r\n\r\n",
    b"NATS/1.0 503\r\n\r\n",
    b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 1016\r\n\r\n",
    b"NATS/1.0 abc\r\nX: 1\r\n\r\n",                          # not a number: no status
]


@pytest.mark.parametrize("block", DATA_BLOCKS)
async def test_a_data_deliverys_headers_parse_as_nats_py_parses_them(block: bytes) -> None:
    assert block.startswith(DATA_HEADER_LINE)
    expected = await NATS()._process_headers(block)
    assert parse_header_block(block) == expected
    delivery = Delivery(NATS(), 1, "s", "r", b"", block)
    assert delivery.headers == expected
    assert delivery.headers is delivery.headers  # parsed once


@pytest.mark.parametrize("block", DATA_BLOCKS)
async def test_one_header_read_without_a_parse_is_the_parsed_value(block: bytes) -> None:
    expected = await NATS()._process_headers(block) or {}
    for name in NAMES:
        delivery = Delivery(NATS(), 1, "s", "r", b"", block)
        assert header_of(delivery, name) == expected.get(name), name
        parsed = delivery.headers or {}  # parsed now: header_of reads the dict
        assert header_of(delivery, name) == parsed.get(name), name
        # Any other Msg: its parsed headers.
        assert header_of(Msg(NATS(), headers=expected or None), name) == expected.get(name)


def test_a_header_of_a_message_without_headers_is_none() -> None:
    assert header_of(Delivery(NATS(), 1, "s", "r", b"x", None), "Nats-Msg-Id") is None
    assert header_of(Msg(NATS()), "Nats-Msg-Id") is None


@pytest.mark.parametrize("block", STATUS_BLOCKS)
async def test_an_inline_status_reads_as_nats_py_reads_it(block: bytes) -> None:
    expected = await NATS()._process_headers(block)
    assert status_of(block) == (expected or {}).get("Status")


def test_a_delivery_without_headers_has_none() -> None:
    assert status_of(None) is None
    assert Delivery(NATS(), 1, "s", "r", b"x", None).headers is None
