"""The buffer's in-memory stream table after a rolled-back transaction: ``restore``
puts back every field the transaction could have changed, forgets streams it minted,
and never lowers what JetStream acknowledged below the trim floor."""

from __future__ import annotations

import sqlite3

from edge_bridge.buffer.schema import create_tables
from edge_bridge.buffer.streams import StreamTable


def test_restore_undoes_a_failed_transaction_field_by_field() -> None:
    conn = sqlite3.connect(":memory:")
    create_tables(conn)
    table = StreamTable()
    kept = table.ensure(conn, "kept")
    kept.next_seq, kept.committed_seq, kept.shipped_seq = 11, 4, 6
    kept.records, kept.bytes, kept.dropped_overflow, kept.dropped_ttl = 6, 600, 1, 2
    table.total_bytes = 600
    before = table.snapshot()

    # what a transaction does before it fails: appends, a trim, drops, a new stream
    kept.next_seq, kept.committed_seq, kept.shipped_seq = 21, 9, 20
    kept.records, kept.bytes, kept.dropped_overflow, kept.dropped_ttl = 11, 1_100, 3, 5
    minted = table.ensure(conn, "minted")
    table.total_bytes = 1_300
    table.restore(before)

    assert table.names() == ["kept"] and table.by_sid == {kept.sid: kept}
    assert minted.sid not in table.by_sid
    assert (kept.next_seq, kept.committed_seq, kept.records, kept.bytes,
            kept.dropped_overflow, kept.dropped_ttl) == (11, 4, 6, 600, 1, 2)
    assert kept.shipped_seq == 20  # JetStream's acks are not undone by a local rollback
    assert table.total_bytes == 600
    kept.shipped_seq = 0
    table.restore(before)
    assert kept.shipped_seq == 4  # but never below the trim floor
