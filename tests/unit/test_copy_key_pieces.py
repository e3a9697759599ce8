"""The record-key pieces of binary COPY rows, kept across groups by a writer
(cloud_ingest.copy_encoding.KeyPieces): the same bytes as built fresh, and bounded."""

from __future__ import annotations

from broker.protocol.wire import CT_JSON, Record
from cloud_ingest.copy_encoding import (
    MAX_CACHED_KEY_CHARS,
    MAX_CACHED_KEYS,
    CopyRows,
    KeyPieces,
)


def _records(keys: list[str | None]) -> list[Record]:
    return [Record(1_700_000_000_000_000 + i, CT_JSON, b'{"i": %d}' % i, key)
            for i, key in enumerate(keys)]


def test_rows_built_with_kept_pieces_are_the_rows_built_fresh() -> None:
    kept = KeyPieces()
    keys: list[str | None] = ["a", None, "b", "a", "x" * (MAX_CACHED_KEY_CHARS + 1), None]
    for received_us, ref in ((1_764_547_200_000_000, 3), (1_764_547_300_000_000, 9)):
        shared, fresh = CopyRows(received_us, kept), CopyRows(received_us)
        for rows in (shared, fresh):
            rows.add(ref, 1, _records(keys))
            rows.add(ref + 1, 40, _records(keys[::-1]))
        assert shared.data() == fresh.data()
        assert shared.data(2, 9) == fresh.data(2, 9)


def test_long_keys_are_not_kept_and_the_cache_starts_over_when_full() -> None:
    kept = KeyPieces()
    long_key = "k" * (MAX_CACHED_KEY_CHARS + 1)
    assert kept[long_key].startswith(len(long_key).to_bytes(4, "big") + long_key.encode())
    assert long_key not in kept
    for i in range(MAX_CACHED_KEYS):
        kept[f"d{i}"]
    assert len(kept) == MAX_CACHED_KEYS
    kept["one more"]
    assert len(kept) == 1 and "one more" in kept


def test_max_record_bytes_bounds_every_row_of_a_group_with_kept_keys() -> None:
    """A group's bound covers each row's payload and key (a key kept from an earlier
    group, a long key never kept, a unicode one) and an opaque row's headers."""
    kept = KeyPieces()
    CopyRows(1, kept).add(3, 1, _records(["é" * 30]))  # kept from an earlier group
    rows = CopyRows(2, kept)
    rows.add(3, 1, _records(["é" * 30, "é" * 300, None]))
    assert rows.max_record_bytes >= len(b'{"i": 0}') + 600  # 300 two-byte characters
    rows.add_one(3, 9, Record(1, 0, bytes(5000), None, {"h": "v" * 100}))
    assert rows.max_record_bytes >= 5000 + len(b'{"h":""}') + 100
    assert CopyRows(3).max_record_bytes == 0
