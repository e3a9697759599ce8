"""Deleting a long outage's backlog at once keeps the buffer's disk use bounded."""

from __future__ import annotations

from pathlib import Path

from broker.protocol.wire import CT_RAW, Record
from broker.settings import StreamPolicy
from edge_bridge.buffer import Buffer, encode_chunks
from edge_bridge.sqlite_files import WAL_SIZE_LIMIT_BYTES, connect_wal

BACKLOG_RECORDS = 400_000  # ~44 MiB in one stream

WAL_BOUND = 8 * 1024**2
"""What deleting the whole backlog may leave in the WAL: the b-tree pages and the
freelist it changes, not the pages it frees."""


async def _backlog(directory: Path) -> Buffer:
    buf = Buffer(directory, max_bytes=10**10, policy_for=lambda s: StreamPolicy())
    await buf.open()
    chunks = encode_chunks([Record(1, CT_RAW, b"x" * 90) for _ in range(1_000)])
    for _ in range(BACKLOG_RECORDS // 1_000):
        await buf.append("s", chunks)
    return buf


def _wal_bytes(buf: Buffer) -> int:
    return Path(f"{buf.path}-wal").stat().st_size


async def test_a_watermark_over_the_whole_backlog_trims_it_without_a_wal_as_large(
    tmp_path: Path,
) -> None:
    """The watermark catches up over a 44 MiB backlog in one trim: the WAL grows by
    the pages the delete changes, not by every page it frees (with SQLite's
    secure_delete on, as Debian builds it, each freed page was zeroed through the
    WAL: the WAL grew to the backlog's size, and stayed that large)."""
    buf = await _backlog(tmp_path / "buf")
    try:
        state = buf.stream_state("s")
        assert state is not None
        start = _wal_bytes(buf)
        assert await buf.trim("s", state.epoch, state.next_seq - 1) == BACKLOG_RECORDS
        grown = _wal_bytes(buf) - start
    finally:
        await buf.close()
    print(f"\nWAL grown by {grown >> 10} KiB trimming {BACKLOG_RECORDS} records")
    assert grown < WAL_BOUND


async def test_expiring_the_whole_backlog_does_not_write_it_again(tmp_path: Path) -> None:
    """TTL expiry of the whole backlog at once (the first check after a long outage):
    the same bound on what the WAL grows by."""
    buf = await _backlog(tmp_path / "buf")
    try:
        start = _wal_bytes(buf)
        assert await buf.expire("s", after_seq=0, ttl_s=1e-6) == BACKLOG_RECORDS
        grown = _wal_bytes(buf) - start
    finally:
        await buf.close()
    assert grown < WAL_BOUND


def test_a_wal_a_large_transaction_grew_is_truncated_after_the_next_checkpoint(
    tmp_path: Path,
) -> None:
    """One transaction writes 96 MiB: the WAL file grows past WAL_SIZE_LIMIT_BYTES;
    after a checkpoint and the next write it is back within the limit (SQLite reuses
    a WAL file and never shrinks it unless told to)."""
    conn = connect_wal(tmp_path / "x.sqlite3", sync_mode="normal")
    try:
        conn.execute("PRAGMA wal_autocheckpoint=0")  # the test checkpoints itself
        conn.execute("CREATE TABLE t (b BLOB)")
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t VALUES (?)", ([b"x" * 100_000] for _ in range(1_000)))
        conn.execute("COMMIT")
        wal = tmp_path / "x.sqlite3-wal"
        assert wal.stat().st_size > WAL_SIZE_LIMIT_BYTES
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        conn.execute("INSERT INTO t VALUES (x'00')")  # restarts the WAL from its start
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        assert wal.stat().st_size <= WAL_SIZE_LIMIT_BYTES
    finally:
        conn.close()
