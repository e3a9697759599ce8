"""Decoding is bounded: zstd bombs and over-count batches cost the ingest a bounded
amount of memory and are dead-lettered once (issue 10, section 3)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import nats
import pytest
import zstandard

from broker.errors import DecodeError
from broker.pg_connecting import connected
from broker.protocol.wire import (
    CT_JSON,
    ENCODING_HEADER,
    MAX_BATCH_BYTES,
    MAX_BATCH_RECORDS,
    Batch,
    Record,
    array_header,
    decode_batch,
    encode_batch,
)
from broker.runtime.children import ServiceProcess
from broker.runtime.embedded_nats import EmbeddedNats
from tests.helpers import until

PEAK_RSS_BOUND = 256 * 1024**2
"""The ingest's peak RSS through the bombs: about half the 512 Mi limit in deploy/.
Before the caps, one bomb alone raised it by ~786 MiB."""
TINY_RECORD = msgspec.msgpack.encode([0, 0, b""])  # 5 bytes: the densest record there is


def bomb_body(edge: str, first_seq: int, count: int) -> bytes:
    """A batch of ``count`` empty records, built without building them."""
    head = msgspec.msgpack.encode({"v": 1, "edge": edge, "stream": "s", "epoch": 7,
                                   "first_seq": first_seq, "records": []})
    return head[:-1] + array_header(count) + TINY_RECORD * count


def test_the_decoder_refuses_a_bomb_after_reading_its_cap() -> None:
    """A 1.5 KB zstd frame expanding to 16+ MiB (3.4 million records) and a batch over
    the record cap are decode errors; the second names its identity range."""
    bomb = zstandard.ZstdCompressor(level=19).compress(bomb_body("e", 1, 3_400_000))
    assert len(bomb) < 4096
    with pytest.raises(DecodeError, match="expands past"):
        decode_batch(bomb, {ENCODING_HEADER: "zstd"})
    with pytest.raises(DecodeError, match="exceeds") as caught:
        decode_batch(bomb_body("e", 1, MAX_BATCH_RECORDS + 1))
    assert caught.value.span == ("e", "s", 7, 1, MAX_BATCH_RECORDS + 1)
    assert MAX_BATCH_BYTES // len(TINY_RECORD) > MAX_BATCH_RECORDS  # the count cap matters


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def test_zstd_bombs_keep_the_ingest_under_its_memory_bound(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """Eight zstd bombs in one fetch, and a batch over the record cap, while another
    edge writes: the ingest (its own process) stays under PEAK_RSS_BOUND, each bomb is
    dead-lettered exactly once, the over-cap batch's seqs are accounted, and the other
    edge's records commit."""
    ingest = ServiceProcess("ingest", {
        "EDGESYNC_INGEST__POSTGRES_DSN": pg_dsn,
        "EDGESYNC_NATS__URL": nats_server.url, "EDGESYNC_INGEST__ACK_WAIT_S": "5",
        "EDGESYNC_LOG__LEVEL": "info",
    }, log_file=tmp_path / "ingest.log")
    await ingest.start()
    try:
        assert ingest.proc is not None
        baseline = peak_rss(ingest.proc.pid)
        bomb = zstandard.ZstdCompressor(level=19).compress(bomb_body("bomber", 1, 3_400_000))
        over_cap = zstandard.ZstdCompressor().compress(
            bomb_body("bomber", 10_000_000, MAX_BATCH_RECORDS + 1))
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            for _ in range(8):
                await js.publish("es.rec.bomber.s", bomb, headers={ENCODING_HEADER: "zstd"})
            await js.publish("es.rec.bomber.s", over_cap, headers={ENCODING_HEADER: "zstd"})
            good, _ = encode_batch(Batch(1, "other", "s", 7, 1,
                                         [Record(0, CT_JSON, b"1")] * 100))
            await js.publish("es.rec.other.s", good)
        finally:
            await nc.close()
        async with connected(pg_dsn) as conn:
            async def settled() -> bool:
                letters = int(await conn.fetchval("SELECT count(*) FROM dead_letters"))
                rows = int(await conn.fetchval("SELECT count(*) FROM records"))
                return letters >= 9 and rows == 100

            await until(settled, timeout=60, interval=0.2)
            await until(lambda: _all_acked(nats_server.url), timeout=15)
            letters = await conn.fetch(
                "SELECT kind, seq, last_seq, reason FROM dead_letters ORDER BY id")
            accounted = await conn.fetchval(
                "SELECT dead_lettered_records FROM v_completeness WHERE edge_id = 'bomber'")
        peak = peak_rss(ingest.proc.pid)
        assert ingest.running, "the ingest died"
    finally:
        await ingest.stop()
    print(f"\ningest peak RSS: baseline {baseline / 2**20:.0f} MiB, "
          f"after bombs {peak / 2**20:.0f} MiB (bound {PEAK_RSS_BOUND / 2**20:.0f} MiB)")
    assert peak < PEAK_RSS_BOUND
    kinds = sorted((r["kind"], r["seq"]) for r in letters)
    assert kinds == [("batch", 10_000_000)] + [("message", None)] * 8
    assert all("expands past" in r["reason"] for r in letters if r["kind"] == "message")
    assert accounted == MAX_BATCH_RECORDS + 1


async def _all_acked(url: str) -> bool:
    """Every message delivered and acked: none can come back to be dead-lettered again."""
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().consumer_info("ES_RECORDS", "ingest")
    finally:
        await nc.close()
    return info.num_pending == 0 and info.num_ack_pending == 0
