"""The chunk codec: a request stored as chunks, byte for byte its records' own encoding."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.protocol.wire import CT_JSON, CT_RAW, Record
from edge_bridge.buffer.chunks import (
    CHUNK_MAX_BYTES,
    CHUNK_MAX_RECORDS,
    STORED_RECORD_OVERHEAD_BYTES,
    encode_chunks,
    split_chunk,
)

RECORDS = st.lists(
    st.builds(Record, st.integers(0, 2**62), st.sampled_from([CT_RAW, CT_JSON]),
              st.binary(max_size=3000), st.one_of(st.none(), st.text(max_size=8)),
              st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.text(max_size=3),
                                                   max_size=2))),
    min_size=1, max_size=2500,
)


@given(RECORDS)
@settings(max_examples=40, deadline=None)
def test_chunks_hold_every_record_once_in_order_within_the_limits(records: list[Record]) -> None:
    """Concatenated, the chunks are the records encoded one by one; each chunk keeps to
    the record and byte limits (a single larger record alone) and is charged its bytes
    plus the per-record overhead."""
    encoded = [msgspec.msgpack.encode(r) for r in records]
    chunks = encode_chunks(records)
    assert b"".join(c.body for c in chunks) == b"".join(encoded)
    assert sum(c.records for c in chunks) == len(records)
    for chunk in chunks:
        assert 1 <= chunk.records <= CHUNK_MAX_RECORDS
        assert chunk.records == 1 or len(chunk.body) <= CHUNK_MAX_BYTES
        assert chunk.size == len(chunk.body) + STORED_RECORD_OVERHEAD_BYTES * chunk.records
        assert len(split_chunk(chunk.body, chunk.records)) == chunk.records


def test_a_request_of_small_records_is_one_chunk_per_thousand() -> None:
    """The common request (1,000 records of a few hundred bytes) is a single chunk."""
    records = [Record(i, CT_JSON, b'{"a":%d}' % i, "k") for i in range(2_500)]
    assert [c.records for c in encode_chunks(records)] == [1_000, 1_000, 500]
