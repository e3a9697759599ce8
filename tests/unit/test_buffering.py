"""The durable edge buffer: identity, de-duplication, group commit, caps and policies."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from broker.errors import BufferFull, ClosedError, InvalidInput
from broker.protocol.wire import CT_JSON, Record, array_header
from broker.settings import StreamPolicy
from edge_bridge.buffer import Buffer, StoredRun, encode_chunks, record_size
from edge_bridge.buffer.recovery import salvage


def recs(n: int, size: int = 10, start: int = 0) -> list[Record]:
    return [Record(1_000 + start + i, CT_JSON, b"1" * size, None, None) for i in range(n)]


def decoded(run: StoredRun) -> list[Record]:
    """The records of a stored run, decoded as the ingest would."""
    return msgspec.msgpack.decode(
        array_header(run.count) + b"".join(run.parts), type=list[Record]
    )


def make(
    tmp_path: Path, *, max_bytes: int = 10**9, policies: dict[str, StreamPolicy] | None = None
) -> Buffer:
    table = policies or {}
    return Buffer(
        tmp_path / "buf", max_bytes=max_bytes, policy_for=lambda s: table.get(s, StreamPolicy())
    )


def make_drop_oldest(tmp_path: Path, *, room_for: int) -> Buffer:
    """A buffer with room for ``room_for`` of :func:`recs`' records, whose stream 'a'
    drops its oldest records at the cap."""
    return make(tmp_path, max_bytes=record_size(recs(1)[0]) * room_for,
                policies={"a": StreamPolicy(overflow="drop_oldest")})


async def test_seqs_are_dense_per_stream_and_survive_reopen(tmp_path: Path) -> None:
    """Each stream counts from 1 without gaps; a reopened buffer continues, same epoch."""
    async with make(tmp_path) as buf:
        a1 = await buf.append("a", encode_chunks(recs(3)))
        b1 = await buf.append("b", encode_chunks(recs(2)))
        a2 = await buf.append("a", encode_chunks(recs(4)))
    assert (a1.first_seq, a1.count, a2.first_seq, b1.first_seq) == (1, 3, 4, 1)
    assert a1.epoch == a2.epoch != b1.epoch
    async with make(tmp_path) as buf:
        a3 = await buf.append("a", encode_chunks(recs(1)))
        stats = await buf.stats()
    assert (a3.epoch, a3.first_seq) == (a1.epoch, 8)
    assert stats.records == 10


async def test_a_wiped_buffer_mints_a_new_epoch(tmp_path: Path) -> None:
    """Identities are never reused: a new buffer file means a new epoch."""
    async with make(tmp_path) as buf:
        first = await buf.append("a", encode_chunks(recs(1)))
    for f in (tmp_path / "buf").iterdir():
        f.unlink()
    async with make(tmp_path) as buf:
        second = await buf.append("a", encode_chunks(recs(1)))
    assert second.first_seq == 1 and second.epoch != first.epoch


async def test_a_retried_request_is_stored_once(tmp_path: Path) -> None:
    """Same producer and request seq: the original answer, no new records."""
    async with make(tmp_path) as buf:
        first = await buf.append("a", encode_chunks(recs(5)), producer="p1", request_seq=7)
        again = await buf.append("a", encode_chunks(recs(5)), producer="p1", request_seq=7)
        other = await buf.append("a", encode_chunks(recs(5)), producer="p2", request_seq=7)
        stats = await buf.stats()
    assert again.duplicate and not first.duplicate
    assert (again.epoch, again.first_seq, again.count) == (first.epoch, 1, 5)
    assert other.first_seq == 6
    assert stats.records == 10


async def test_concurrent_retries_in_one_group_are_stored_once(tmp_path: Path) -> None:
    """Two copies of one request committed in the same transaction still dedupe."""
    async with make(tmp_path) as buf:
        results = await asyncio.gather(
            *[buf.append("a", encode_chunks(recs(2)), producer="p", request_seq=1)
              for _ in range(20)]
        )
        stats = await buf.stats()
    assert stats.records == 2
    assert sum(not r.duplicate for r in results) == 1


async def test_concurrent_appends_are_group_committed(tmp_path: Path) -> None:
    """Many concurrent requests share transactions (fewer commits than requests)."""
    async with make(tmp_path) as buf:
        results = await asyncio.gather(
            *[buf.append("a", encode_chunks(recs(10))) for _ in range(200)])
        commits = buf.commits
    seqs = sorted(s for r in results for s in range(r.first_seq, r.first_seq + r.count))
    assert seqs == list(range(1, 2001))
    assert commits < 200


async def test_block_policy_refuses_at_the_cap(tmp_path: Path) -> None:
    """With 'block', a full buffer raises BufferFull (HTTP 503) and keeps what it has."""
    per = record_size(recs(1)[0])
    async with make(tmp_path, max_bytes=per * 10) as buf:
        await buf.append("a", encode_chunks(recs(10)))
        with pytest.raises(BufferFull) as info:
            await buf.append("a", encode_chunks(recs(1)))
        assert info.value.retry_after > 0
        stats = await buf.stats()
    assert stats.records == 10 and stats.dropped["a"]["overflow"] == 0


async def test_drop_oldest_makes_room_and_counts_every_drop(tmp_path: Path) -> None:
    """With 'drop_oldest', the stream's oldest records go and are counted."""
    async with make_drop_oldest(tmp_path, room_for=10) as buf:
        await buf.append("a", encode_chunks(recs(10)))
        await buf.append("a", encode_chunks(recs(3)))
        stats = await buf.stats()
        runs = await buf.read_runs("a", 0, max_records=100, max_bytes=10**6)
    assert stats.records == 10
    assert stats.dropped["a"] == {"overflow": 3, "ttl": 0}
    assert [(r.first_seq, r.last_seq) for r in runs] == [(4, 13)]


async def test_drop_oldest_that_needs_a_whole_chunk_by_records_drops_it(
        tmp_path: Path) -> None:
    """When the bytes to free end inside a chunk's last record, that whole chunk goes
    (its 3 records counted) and the append is stored; it used to raise an IntegrityError
    (an empty rest of the chunk renamed onto the next chunk's first seq)."""
    per = record_size(recs(1)[0])
    async with make(tmp_path, max_bytes=10 * per + 20,
                    policies={"a": StreamPolicy(overflow="drop_oldest")}) as buf:
        await buf.append("a", encode_chunks(recs(3)))
        await buf.append("a", encode_chunks(recs(7, start=3)))
        r = await buf.append("a", encode_chunks(recs(3, start=10)))  # frees 3*per - 20
        stats = await buf.stats()
        runs = await buf.read_runs("a", 0, max_records=100, max_bytes=10**6)
    assert (r.first_seq, r.count) == (11, 3)
    assert stats.dropped["a"] == {"overflow": 3, "ttl": 0}
    assert [(x.first_seq, x.last_seq) for x in runs] == [(4, 13)]
    assert [x.ts for x in decoded(runs[0])] == [x.ts for x in recs(10, start=3)]


async def test_drop_oldest_counts_survive_restart(tmp_path: Path) -> None:
    async with make_drop_oldest(tmp_path, room_for=4) as buf:
        await buf.append("a", encode_chunks(recs(4)))
        await buf.append("a", encode_chunks(recs(2)))
    async with make_drop_oldest(tmp_path, room_for=4) as buf:
        stats = await buf.stats()
    assert stats.dropped["a"]["overflow"] == 2 and stats.records == 4


async def test_a_request_larger_than_the_buffer_is_invalid(tmp_path: Path) -> None:
    async with make(tmp_path, max_bytes=100_000) as buf:
        with pytest.raises(InvalidInput, match="exceeds the whole buffer"):
            await buf.append("a", encode_chunks(recs(1, size=200_000)))


async def test_an_append_without_records_is_invalid_and_stores_nothing(tmp_path: Path) -> None:
    async with make(tmp_path) as buf:
        with pytest.raises(InvalidInput, match="at least one record"):
            await buf.append("a", [])
        assert (await buf.stats()).records == 0 and buf.stream_names() == []


async def test_read_runs_split_at_gaps_and_respect_limits(tmp_path: Path) -> None:
    """Runs are contiguous (a valid batch each) and bounded in count and bytes."""
    per = record_size(recs(1)[0])
    async with make(tmp_path) as buf:
        await buf.append("a", encode_chunks(recs(10)))
        all_runs = await buf.read_runs("a", 0, max_records=4, max_bytes=10**6)
        small = await buf.read_runs("a", 0, max_records=100, max_bytes=per * 3)
        after = await buf.read_runs("a", 8, max_records=100, max_bytes=10**6)
    assert [(r.first_seq, r.last_seq) for r in all_runs] == [(1, 4)]
    assert [(r.first_seq, r.last_seq) for r in small] == [(1, 3)]
    assert [(r.first_seq, r.last_seq) for r in after] == [(9, 10)]
    first = decoded(after[0])[0]
    assert (first.ts, first.ct, first.payload) == (1_008, CT_JSON, b"1" * 10)


@pytest.mark.parametrize(("max_records", "max_bytes"), [(1, 10**6), (7, 10**6), (1_500, 10**6),
                                                       (10**4, 1), (10**4, 1_000), (333, 9_999)])
async def test_reading_in_cut_batches_yields_every_record_once_in_order(
        tmp_path: Path, max_records: int, max_bytes: int) -> None:
    """The shipper's walk: each read starts after the last, so chunks are cut by the
    limits and entered mid-way; the runs keep to the limits (at least one record each)
    and together are every record, byte for byte, in order."""
    sizes = [1_000, 3, 640, 1_000, 17]  # requests of different sizes: chunks of each
    stored: list[Record] = []
    async with make(tmp_path) as buf:
        for i, n in enumerate(sizes):
            batch = [Record(1_000 * i + j, CT_JSON, b"7" * (j % 50 + 1), f"k{j}")
                     for j in range(n)]
            await buf.append("a", encode_chunks(batch))
            stored += batch
        runs: list[StoredRun] = []
        after = 0
        while after < len(stored):
            got = await buf.read_runs("a", after, max_records=max_records, max_bytes=max_bytes)
            assert got and got[0].first_seq == after + 1
            runs += got
            after = got[-1].last_seq
    for run in runs:
        assert 1 <= run.count <= max_records
        assert run.count == 1 or run.nbytes <= max_bytes
        assert run.nbytes == sum(record_size(r) for r in decoded(run))
    assert [r for run in runs for r in decoded(run)] == stored


async def test_trim_deletes_and_frees_space(tmp_path: Path) -> None:
    async with make(tmp_path) as buf:
        r = await buf.append("a", encode_chunks(recs(10)))
        deleted = await buf.trim("a", r.epoch, 6)
        wrong_epoch = await buf.trim("a", r.epoch + 1, 10)
        stats = await buf.stats()
        runs = await buf.read_runs("a", 0, max_records=100, max_bytes=10**6)
    assert (deleted, wrong_epoch, stats.records) == (6, 0, 4)
    assert runs[0].first_seq == 7
    assert stats.bytes == sum(record_size(r) for r in recs(10)[6:])


async def test_headers_and_keys_are_kept(tmp_path: Path) -> None:
    async with make(tmp_path) as buf:
        await buf.append("a", encode_chunks([Record(5, CT_JSON, b"{}", "key-1", {"h": "v"})]))
        runs = await buf.read_runs("a", 0, max_records=10, max_bytes=10**6)
    assert decoded(runs[0]) == [Record(5, CT_JSON, b"{}", "key-1", {"h": "v"})]


async def test_use_after_close_is_a_clear_error(tmp_path: Path) -> None:
    buf = make(tmp_path)
    async with buf:
        pass
    await buf.close()  # idempotent
    with pytest.raises(ClosedError):
        await buf.append("a", encode_chunks(recs(1)))


async def test_expire_drops_only_old_unshipped_records_and_counts_them(tmp_path: Path) -> None:
    """TTL expiry removes the records above the cursor received before the cutoff,
    counts them as 'ttl', and remembers the run as a pending drop."""
    async with make(tmp_path) as buf:
        first = await buf.append("a", encode_chunks(recs(5)))
        none_yet = await buf.expire("a", after_seq=0, ttl_s=3600)
        expired = await buf.expire("a", after_seq=2, ttl_s=0.0)
        stats = await buf.stats()
        drops = await buf.pending_drops()
        runs = await buf.read_runs("a", 0, max_records=10, max_bytes=10**6)
    assert (none_yet, expired) == (0, 3)
    assert stats.dropped["a"] == {"overflow": 0, "ttl": 3}
    assert [(r.first_seq, r.last_seq) for r in runs] == [(1, 2)]
    assert [d[:6] for d in drops] == [("a", first.epoch, 3, 5, 3, "ttl")]


async def test_trim_past_a_drop_run_forgets_it(tmp_path: Path) -> None:
    """Once the committed watermark passes a drop run, it is no longer pending."""
    async with make(tmp_path) as buf:
        r = await buf.append("a", encode_chunks(recs(5)))
        await buf.expire("a", after_seq=3, ttl_s=0.0)
        assert len(await buf.pending_drops()) == 1
        await buf.trim("a", r.epoch, 3)
        assert len(await buf.pending_drops()) == 1
        await buf.trim("a", r.epoch, 5)
        assert await buf.pending_drops() == []


async def test_rewind_forgets_shipping_above_the_committed_watermark(tmp_path: Path) -> None:
    async with make(tmp_path) as buf:
        r = await buf.append("a", encode_chunks(recs(10)))
        buf.mark_shipped("a", 8)
        await buf.trim("a", r.epoch, 3)
        state = buf.stream_state("a")
        assert state is not None and state.shipped_seq == 8
        buf.rewind_shipped("a")
        assert state.shipped_seq == 3
        assert (await buf.stats()).unshipped_records == 7


async def test_large_requests_are_stored_in_chunks_and_read_back_in_order(
    tmp_path: Path,
) -> None:
    """A request larger than a chunk spans several; reads may start and stop inside a
    chunk and still return exactly the records asked for."""
    records = recs(2_500, start=0)
    async with make(tmp_path) as buf:
        await buf.append("a", encode_chunks(records))
        head = await buf.read_runs("a", 0, max_records=700, max_bytes=10**9)
        middle = await buf.read_runs("a", 700, max_records=1_000, max_bytes=10**9)
        tail = await buf.read_runs("a", 1_700, max_records=10_000, max_bytes=10**9)
        r = await buf.append("a", encode_chunks(recs(1)))
        await buf.trim("a", r.epoch, 1_234)  # the watermark lands inside a chunk
        after_trim = await buf.read_runs("a", 0, max_records=10_000, max_bytes=10**9)
        stats = await buf.stats()
    got = [x for run in head + middle + tail for x in decoded(run)]
    assert got == records
    assert [(x.first_seq, x.last_seq) for x in head + middle + tail] == [
        (1, 700), (701, 1_700), (1_701, 2_500)]
    assert [(x.first_seq, x.last_seq) for x in after_trim] == [(1_235, 2_501)]
    assert decoded(after_trim[0])[0] == records[1_234]
    assert stats.records == 2_501 - 1_234
    assert stats.bytes == sum(record_size(x) for x in records[1_234:]) + record_size(recs(1)[0])


def _damage(path: Path, offset: int, length: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(bytes(range(256)) * (length // 256 + 1))


async def test_a_damaged_buffer_is_quarantined_and_its_intact_records_kept(
    tmp_path: Path,
) -> None:
    """Pages of a stopped buffer overwritten with garbage: the buffer opens, moves the
    damaged file to quarantine/, keeps every chunk it can still read with its identity,
    counts what it could not, and hands out no seq twice."""
    big = [Record(i, CT_JSON, b"7" * 3000) for i in range(200)]
    async with make(tmp_path) as buf:
        small = await buf.append("keep", encode_chunks(recs(5)))
        for i in range(0, 200, 10):
            await buf.append("bulk", encode_chunks(big[i:i + 10]))
    db = tmp_path / "buf" / "buffer.sqlite3"
    size = db.stat().st_size
    _damage(db, size // 2, 4096 * 3)  # three pages in the middle of the chunk data
    async with make(tmp_path) as buf:
        stats = await buf.stats()
        keep = await buf.read_runs("keep", 0, max_records=100, max_bytes=10**9)
        bulk = await buf.read_runs("bulk", 0, max_records=1_000, max_bytes=10**9)
        again = await buf.append("keep", encode_chunks(recs(1)))
        quarantined, lost = buf.recovery.quarantined, buf.recovery.lost_records
    assert quarantined == 1
    assert list((tmp_path / "buf" / "quarantine").iterdir())
    assert [x for run in keep for x in decoded(run)] == recs(5)
    assert (again.epoch, again.first_seq) == (small.epoch, 6)  # same identity line
    kept = sum(run.count for run in bulk)
    assert 0 < kept < 200  # some chunks were behind the damaged pages
    assert stats.records == 5 + kept
    for run in bulk:  # whatever was kept is intact and where it was
        assert decoded(run) == big[run.first_seq - 1:run.last_seq]
    assert lost + kept <= 200


async def test_a_truncated_buffer_opens_and_never_reuses_an_identity(tmp_path: Path) -> None:
    """A buffer file cut in half: the bridge still opens (no crash loop), and whatever
    it could not read, no (epoch, seq) it handed out is ever handed out again."""
    async with make(tmp_path) as buf:
        for _ in range(20):
            old = await buf.append("a", encode_chunks([Record(0, CT_JSON, b"x" * 2000)] * 10))
    db = tmp_path / "buf" / "buffer.sqlite3"
    with db.open("r+b") as f:
        f.truncate(db.stat().st_size // 2)
    async with make(tmp_path) as buf:
        stats = await buf.stats()
        again = await buf.append("a", encode_chunks(recs(1)))
        quarantined = buf.recovery.quarantined
    assert quarantined == 1
    assert stats.records < 200
    assert again.epoch != old.epoch or again.first_seq > old.first_seq + old.count - 1


async def test_drops_at_every_append_under_a_long_outage_keep_one_pending_run(
    tmp_path: Path,
) -> None:
    """A full drop_oldest stream drops at every append (the uplink is down for days):
    each drop continues the previous one, so the pending drop runs (a table row each,
    read by the reporter every second and sent as markers) stay one run covering every
    dropped seq, with the exact count, not one row per append."""
    async with make_drop_oldest(tmp_path, room_for=10) as buf:
        await buf.append("a", encode_chunks(recs(10)))
        for _ in range(2_000):
            await buf.append("a", encode_chunks(recs(1)))
        drops = await buf.pending_drops()
        stats = await buf.stats()
    assert stats.dropped["a"]["overflow"] == 2_000
    assert [(d.first_seq, d.last_seq, d.records, d.reason) for d in drops] == [
        (1, 2_000, 2_000, "overflow")]


async def test_expiry_runs_that_continue_each_other_are_one_pending_run(
    tmp_path: Path,
) -> None:
    """TTL expiry during an outage drops what aged out at each check: consecutive
    expiries extend one run; a run of another reason is not merged into it."""
    async with make(tmp_path, max_bytes=record_size(recs(1)[0]) * 10,
                    policies={"a": StreamPolicy(overflow="drop_oldest")}) as buf:
        for _ in range(5):
            await buf.append("a", encode_chunks(recs(2)))
            assert await buf.expire("a", after_seq=0, ttl_s=1e-9) == 2
        await buf.append("a", encode_chunks(recs(10)))
        await buf.append("a", encode_chunks(recs(3)))  # overflow: drops seqs 11..13
        drops = await buf.pending_drops()
        stats = await buf.stats()
    assert stats.dropped["a"] == {"overflow": 3, "ttl": 10}
    assert [(d.first_seq, d.last_seq, d.records, d.reason) for d in drops] == [
        (1, 10, 10, "ttl"), (11, 13, 3, "overflow")]


async def test_a_salvage_finished_before_a_crash_is_taken_at_the_next_open(
    tmp_path: Path,
) -> None:
    """Killed after the damaged file went to quarantine but before the finished salvage
    file took its place: the next open takes that file (identities and counts kept)
    instead of starting an empty buffer beside it."""
    async with make(tmp_path) as buf:
        first = await buf.append("a", encode_chunks(recs(5)))
    db = tmp_path / "buf" / "buffer.sqlite3"
    found = salvage(db, db.with_name("buffer.sqlite3.salvage"))
    db.rename(tmp_path / "quarantined.sqlite3")  # where the crash left it
    async with make(tmp_path) as buf:
        runs = await buf.read_runs("a", 0, max_records=100, max_bytes=10**6)
        again = await buf.append("a", encode_chunks(recs(1)))
        kept = buf.recovery.salvaged_records
    assert found.records == kept == 5
    assert [x for run in runs for x in decoded(run)] == recs(5)
    assert (again.epoch, again.first_seq) == (first.epoch, 6)


async def test_stats_over_many_streams_take_one_trip_to_the_reader_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heartbeats and gauges read every stream's oldest record: with 500 streams that
    is one job on the reader thread (the shipper reads on it too), not one per stream
    (two per stream and heartbeat before: ~0.5 s of that thread every 5 s with 2,000
    streams); the answers are each stream's own."""
    async with make(tmp_path) as buf:
        for i in range(500):
            await buf.append(f"s{i}", encode_chunks(recs(2)))
        buf.mark_shipped("s0", 2)
        trips = 0
        in_reader = buf._in_reader

        async def counted(*args: object) -> object:
            nonlocal trips
            trips += 1
            return await in_reader(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(buf, "_in_reader", counted)
        stats = await buf.stats()
        oldest = await buf.oldest_received_each(unshipped=False)
        unshipped = await buf.oldest_received_each(unshipped=True)
        assert trips == 4  # stats: the oldest records and the file sizes; then one each
    assert stats.records == 1_000 and stats.oldest_unshipped_age_s >= 0
    assert len(oldest) == 500 and all(v is not None for v in oldest.values())
    assert unshipped["s0"] is None and unshipped["s1"] == oldest["s1"]
