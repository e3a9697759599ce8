"""The committed tail: the shipper's reads served from memory equal what SQLite holds,
fall back to SQLite when memory cannot tell (restart, rewind, eviction), and stay
within their memory bound under any backlog."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

import msgspec
import pytest
import structlog.testing

from broker.errors import BufferFull
from broker.protocol.wire import CT_JSON, Record, array_header
from broker.settings import StreamPolicy
from edge_bridge.buffer import Buffer, StoredRun, encode_chunks, reads, record_size
from edge_bridge.buffer.reads import read_runs
from edge_bridge.buffer.schema import connect
from edge_bridge.buffer.streams import StreamTable
from edge_bridge.buffer.tail import TAIL_MAX_BYTES, CommittedTail
from edge_bridge.buffer.writer import GroupWriter


def recs(n: int, *, start: int = 0, size: int = 10) -> list[Record]:
    return [Record(1_000 + start + i, CT_JSON, b"1" * size, f"k{start + i}", None)
            for i in range(n)]


def decoded(runs: list[StoredRun]) -> list[Record]:
    return [r for run in runs for r in msgspec.msgpack.decode(
        array_header(run.count) + b"".join(run.parts), type=list[Record])]


def make(tmp_path: Path, *, max_bytes: int = 10**9, overflow: str = "block") -> Buffer:
    policy = StreamPolicy(overflow=overflow)  # type: ignore[arg-type]
    return Buffer(tmp_path / "buf", max_bytes=max_bytes, policy_for=lambda s: policy)


def from_sqlite(buf: Buffer, stream: str, after: int, *, max_records: int,
                max_bytes: int) -> list[StoredRun]:
    """What the reads return from the file itself (a connection of their own)."""
    state = buf.stream_state(stream)
    assert state is not None
    conn = connect(buf.path, sync_mode="normal")
    try:
        return read_runs(conn, stream=stream, sid=state.sid, epoch=state.epoch,
                         after_seq=after, max_records=max_records, max_bytes=max_bytes)
    finally:
        conn.close()


def shape(runs: list[StoredRun]) -> list[tuple[int, int, bytes, int]]:
    return [(r.first_seq, r.last_seq, b"".join(r.parts), r.nbytes) for r in runs]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("room", [8_000, 10**7])
async def test_reads_from_memory_equal_reads_from_sqlite_through_every_change(
        tmp_path: Path, seed: int, room: int) -> None:
    """Appends, trims (inside chunks too), TTL expiry, overflow drops (with room for
    8,000 records) and rewinds in a random order: every read answers exactly what a read
    of the file answers, and many reads are answered from memory."""
    rng = random.Random(seed)
    per = record_size(recs(1)[0])
    async with make(tmp_path, max_bytes=per * room, overflow="drop_oldest") as buf:
        cursor = committed = 0
        appended = 0
        for _ in range(300):
            op = rng.random()
            state = buf.stream_state("a")
            if op < 0.35 or state is None:
                n = rng.choice([1, 3, 40, 700, 1_000, 1_300])
                await buf.append("a", encode_chunks(recs(n, start=appended)))
                appended += n
                continue
            if op < 0.45:
                upto = rng.randint(committed, state.next_seq - 1)
                await buf.trim("a", state.epoch, upto)
                committed = max(committed, upto)
                cursor = max(cursor, committed)
            elif op < 0.5:
                await buf.expire("a", after_seq=rng.randint(cursor, state.next_seq - 1),
                                 ttl_s=0.0)
            elif op < 0.55:
                cursor = committed  # a retransmission rewinds to the committed watermark
            limits = {"max_records": rng.choice([1, 50, 999, 2_000]),
                      "max_bytes": rng.choice([per * 10, 10**6])}
            truth = from_sqlite(buf, "a", cursor, **limits)
            got = await buf.read_runs("a", cursor, **limits)
            assert shape(got) == shape(truth)
            if got:
                cursor = got[-1].last_seq
        assert buf.tail.hits > 40  # not vacuous: memory answered many of them


async def test_after_a_restart_the_reads_come_from_sqlite_then_from_memory(
        tmp_path: Path) -> None:
    """A reopened buffer remembers nothing in memory: what was stored before is read
    from the file (all of it, in order), what is appended after from memory."""
    async with make(tmp_path) as buf:
        await buf.append("a", encode_chunks(recs(1_500)))
        await buf.read_runs("a", 0, max_records=10, max_bytes=10**6)
        assert (buf.tail.hits, buf.tail.misses) == (1, 0)
    async with make(tmp_path) as buf:
        before = await buf.read_runs("a", 0, max_records=10_000, max_bytes=10**9)
        assert (buf.tail.hits, buf.tail.misses) == (0, 1)
        await buf.append("a", encode_chunks(recs(5, start=1_500)))
        after = await buf.read_runs("a", 1_500, max_records=10_000, max_bytes=10**9)
        assert (buf.tail.hits, buf.tail.misses) == (1, 1)
    assert decoded(before) == recs(1_500)
    assert decoded(after) == recs(5, start=1_500)


async def test_memory_stays_bounded_under_a_backlog_and_every_record_is_read_once(
        tmp_path: Path) -> None:
    """Nobody reads while far more than the tail's bound is appended: the tail holds at
    most its bound, and the reads then return every record once, in order (the oldest
    from SQLite, the newest from memory)."""
    size = 2_000
    n = TAIL_MAX_BYTES // size * 2 // 100 * 100  # twice the bound
    async with make(tmp_path) as buf:
        for start in range(0, n, 100):
            await buf.append("a", encode_chunks(recs(100, start=start, size=size)))
            assert buf.tail.nbytes <= TAIL_MAX_BYTES
        assert buf.tail.nbytes > TAIL_MAX_BYTES // 2
        got: list[StoredRun] = []
        after = 0
        while runs := await buf.read_runs("a", after, max_records=2_000, max_bytes=10**6):
            got += runs
            after = runs[-1].last_seq
        assert buf.tail.misses >= 1 and buf.tail.hits >= 1
    assert [r.ts for r in decoded(got)] == [r.ts for r in recs(n, size=size)]


async def test_a_refused_append_leaves_memory_as_it_was(tmp_path: Path) -> None:
    """An append rolled back (the buffer is full and the policy blocks) adds nothing
    to the tail; the next read still answers exactly what is stored."""
    per = record_size(recs(1)[0])
    async with make(tmp_path, max_bytes=per * 10) as buf:
        await buf.append("a", encode_chunks(recs(8)))
        held = buf.tail.nbytes
        with pytest.raises(BufferFull):
            await buf.append("a", encode_chunks(recs(5, start=8)))
        assert buf.tail.nbytes == held
        runs = await buf.read_runs("a", 0, max_records=100, max_bytes=10**6)
    assert decoded(runs) == recs(8)


async def test_after_commit_hooks_run_before_the_result_and_never_for_a_rollback(
        tmp_path: Path) -> None:
    """The writer runs an operation's after-commit callbacks once its transaction
    committed, before its caller resumes; an operation that raised registers none."""
    writer = GroupWriter(StreamTable(), name="test-writer")
    seen: list[str] = []
    await writer.start(lambda: sqlite3.connect(tmp_path / "x.sqlite3", isolation_level=None))

    def good(conn: sqlite3.Connection) -> str:
        writer.after_commit(lambda: seen.append("good"))
        return "ok"

    def bad(conn: sqlite3.Connection) -> str:
        writer.after_commit(lambda: seen.append("bad"))
        raise ValueError("refused")

    try:
        results = await asyncio.gather(writer.submit(good), writer.submit(bad),
                                       return_exceptions=True)
        assert seen == ["good"]
        assert results[0] == "ok" and isinstance(results[1], ValueError)
    finally:
        await writer.stop()


def test_a_trim_inside_a_chunk_forgets_that_chunk() -> None:
    """The file keeps a trimmed chunk's rest as a new row; the tail cannot hold it, so
    it moves its cover past that chunk and a read inside it goes to SQLite."""
    tail = CommittedTail()
    tail.appended(1, [(1, 10, 10, b"x" * 10), (11, 20, 10, b"y" * 10)])
    tail.trimmed(1, 5)
    assert tail.rows_after(1, 5) is None
    assert tail.rows_after(1, 10) == [(11, 20, 10, b"y" * 10)]


async def test_records_dropped_for_room_are_not_read_from_memory(tmp_path: Path) -> None:
    """drop_oldest deletes unread records at the cap: the reads that follow start
    after them, as the file does, though memory held them a moment before."""
    per = record_size(recs(1)[0])
    async with make(tmp_path, max_bytes=per * 100, overflow="drop_oldest") as buf:
        await buf.append("a", encode_chunks(recs(60)))
        await buf.append("a", encode_chunks(recs(60, start=60)))
        runs = await buf.read_runs("a", 0, max_records=1_000, max_bytes=10**6)
        dropped = (await buf.stats()).dropped["a"]["overflow"]
        assert buf.tail.misses == 1  # memory no longer covers seq 1: the file answers
    assert dropped == 24  # the first chunk's oldest, cut inside it
    assert [(r.first_seq, r.last_seq) for r in runs] == [(25, 120)]
    assert decoded(runs) == recs(96, start=24)


async def test_committed_records_leave_memory_when_trimmed(tmp_path: Path) -> None:
    """Records the cloud committed are trimmed from memory too, read or not."""
    async with make(tmp_path) as buf:
        r = await buf.append("a", encode_chunks(recs(50)))
        await buf.append("a", encode_chunks(recs(50, start=50)))
        assert buf.tail.nbytes > 0
        await buf.trim("a", r.epoch, 100)
        assert buf.tail.nbytes == 0


async def test_a_chunk_cut_by_a_batch_limit_is_split_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that a limit stops inside a chunk leaves that chunk's rest in memory, so
    the next read takes the rest whole instead of splitting the chunk again: one split
    per chunk a limit cuts (the 2nd and 4th here), not two; the records come back all,
    once, in order."""
    splits = 0
    real = reads.split_chunk

    def counting(body: bytes, count: int) -> list[bytes]:
        nonlocal splits
        splits += 1
        return real(body, count)

    monkeypatch.setattr(reads, "split_chunk", counting)
    async with make(tmp_path) as buf:
        for i in range(6):
            await buf.append("a", encode_chunks(recs(600, start=600 * i)))
        got: list[StoredRun] = []
        after = 0
        while runs := await buf.read_runs("a", after, max_records=1_000, max_bytes=10**9):
            got += runs
            after = runs[-1].last_seq
        assert buf.tail.misses == 0
    assert [r.count for r in got] == [1_000, 1_000, 1_000, 600]
    assert splits == 2
    assert decoded(got) == recs(3_600)


async def test_closing_logs_how_many_reads_memory_answered(tmp_path: Path) -> None:
    """buffer_closed says how many reads came from memory and how many from the file."""
    buf = make(tmp_path)
    async with buf:
        await buf.append("a", encode_chunks(recs(5)))
        await buf.read_runs("a", 0, max_records=10, max_bytes=10**6)
        await buf.read_runs("a", -5, max_records=10, max_bytes=10**6)
        with structlog.testing.capture_logs() as logs:
            await buf.close()
    closed = [e for e in logs if e["event"] == "buffer_closed"]
    assert [(e["reads_from_memory"], e["reads_from_file"]) for e in closed] == [(1, 1)]
