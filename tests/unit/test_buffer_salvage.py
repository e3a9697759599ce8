"""Salvaging a damaged buffer file keeps everything that is intact: the pending drop runs
(a WITHOUT ROWID table, which the rowid probe could not read) and the chunks after a long
run of trimmed rowids (which the probe took for damage and gave up on)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec

from broker.protocol.wire import CT_RAW, Record
from edge_bridge.buffer.recovery import salvage
from edge_bridge.buffer.schema import create_tables


def _body(seq: int, size: int) -> bytes:
    return msgspec.msgpack.encode(Record(seq, CT_RAW, b"y" * size, None, None))


def _chunk(conn: sqlite3.Connection, rowid: int | None, sid: int, first: int, last: int,
           body: bytes) -> None:
    conn.execute("INSERT INTO chunks(rowid, sid, first_seq, last_seq, received, size, body)"
                 " VALUES (?, ?, ?, ?, 0, ?, ?)", (rowid, sid, first, last, len(body), body))


def test_a_salvage_keeps_the_pending_drop_runs_and_tells_them_from_damage(
        tmp_path: Path) -> None:
    """Seqs 1..20 stored, 21..30 dropped by overflow (a pending run, already reported as
    such), 31..40 stored in a chunk that no longer decodes. Before: the run was never
    read, 10,000 unreadable rows were counted, and 21..40 became one ``damaged`` run
    (the cloud then filed real damage under overflow)."""
    path = tmp_path / "buffer.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    create_tables(conn)
    conn.execute("INSERT INTO streams VALUES (1, 's', 7, 41, 0, 10, 0)")
    for seq in range(1, 21):
        _chunk(conn, None, 1, seq, seq, _body(seq, 100))
    _chunk(conn, None, 1, 31, 40, b"\xc1garbage")
    conn.execute("INSERT INTO drops VALUES (1, 7, 21, 30, 10, 'overflow', 0)")
    conn.close()
    out = salvage(path, tmp_path / "salvaged.sqlite3")
    with sqlite3.connect(tmp_path / "salvaged.sqlite3") as dst:
        drops = dst.execute(
            "SELECT first_seq, last_seq, count, reason FROM drops ORDER BY 1").fetchall()
    assert drops == [(21, 30, 10, "overflow"), (31, 40, 10, "damaged")]
    assert out.unreadable_rows == 0


def test_a_salvage_past_a_run_of_trimmed_rowids_keeps_the_intact_chunks(
        tmp_path: Path) -> None:
    """'stuck' kept its 40 first chunks (rowids 1..40); 20,000 chunks of 'busy' after
    them were trimmed (rowids 41..20,040 gone); 40 live chunks of 'busy' follow. One leaf
    page among the early 'stuck' rows is damaged. Before: the probe counted the trimmed
    rowids as misses, gave up, and every 'busy' chunk was reported lost (damaged)."""
    path = tmp_path / "buffer.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    create_tables(conn)
    conn.execute("INSERT INTO streams VALUES (1, 'stuck', 7, 41, 0, 0, 0)")
    conn.execute("INSERT INTO streams VALUES (2, 'busy', 9, 20041, 20000, 0, 0)")
    conn.execute("BEGIN")
    for seq in range(1, 41):
        _chunk(conn, seq, 1, seq, seq, _body(seq, 1500))
    for seq in range(20001, 20041):
        _chunk(conn, seq + 40, 2, seq, seq, _body(seq, 1500))
    conn.execute("COMMIT")
    pages = [r[0] for r in conn.execute(
        "SELECT pageno FROM dbstat WHERE name='chunks' AND pagetype='leaf' ORDER BY pageno")]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with path.open("r+b") as f:  # a leaf page among the early 'stuck' rows, overwritten
        f.seek((pages[2] - 1) * page_size)
        f.write(b"\xff" * page_size)
    out = salvage(path, tmp_path / "salvaged.sqlite3")
    with sqlite3.connect(tmp_path / "salvaged.sqlite3") as dst:
        busy = dst.execute("SELECT count(*) FROM chunks WHERE sid = 2").fetchone()[0]
        damaged = dst.execute("SELECT sid FROM drops WHERE reason = 'damaged'").fetchall()
    assert busy == 40
    assert damaged and {sid for (sid,) in damaged} == {1}  # only 'stuck' lost records
    assert out.records < 80
