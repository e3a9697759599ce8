"""Reads over HTTP are bounded by bytes as well as by records (``api.page_max_bytes``):
a JSON page of large records ends early (caught_up false, next_cursor after its last
record) and the next one resumes exactly; a record larger than the budget comes alone;
an NDJSON stream reads its pages under the same budget, so what it holds at once does
not grow with the records' size."""

from __future__ import annotations

import gc
import json
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from broker.protocol.topology import Topology
from broker.protocol.wire import CT_JSON, Batch, Record, encode_batch
from broker.runtime.embedded_nats import EmbeddedNats
from tests.integration.control_harness import ControlPlane, control_plane
from tests.integration.harness import wait_for_records

EPOCH = 9
BUDGET = 16 * 1024


def _record(seq: int, n: int) -> Record:
    """A JSON record whose payload is a string of ``n`` characters, keyed."""
    return Record(1_700_000_000_000_000 + seq, CT_JSON, msgspec.json.encode("x" * n),
                  f"k{seq}")


def size_of(record: dict[str, Any]) -> int:
    """The bytes the budget counts of a record as the API returns it (JSON payload)."""
    return (len(msgspec.json.encode(record["payload"])) + len((record["key"] or "").encode())
            + (len(msgspec.json.encode(record["headers"])) if record["headers"] else 0))


async def publish(nats_url: str, stream: str, batches: list[list[Record]]) -> None:
    nc = await nats.connect(nats_url)
    try:
        seq = 1
        for records in batches:
            body, _ = encode_batch(Batch(1, "e1", stream, EPOCH, seq, records))
            await nc.jetstream().publish(Topology().records_subject("e1", stream), body)
            seq += len(records)
    finally:
        await nc.close()


@pytest.fixture
async def plane(tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
                ) -> AsyncIterator[ControlPlane]:
    """API with a 16 KiB page budget, and ingest."""
    async with control_plane(tmp_path, nats_server.url, pg_dsn, read_requires_token=True,
                             page_max_bytes=BUDGET) as plane:
        yield plane


async def test_json_pages_stop_at_the_byte_budget_and_resume_exactly(
    plane: ControlPlane
) -> None:
    """Batches of 3 KB, 40 KB and 5 KB records, read with limit=10000: each page within
    16 KiB or a single record (the 40 KB one alone); a page that ended early says
    caught_up false and its next_cursor is its last record's cursor; every record
    comes once, in order, whole."""
    await publish(plane.nats_url, "s", [[_record(s, 3000) for s in range(1, 11)],
                                        [_record(11, 40_000)],
                                        [_record(s, 5000) for s in range(12, 18)]])
    await wait_for_records(plane.pg_dsn, 17)
    pages: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 10_000} | ({"after": cursor} if cursor else {})
        resp = await plane.http.get("/v1/records", params=params)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        pages.append(page)
        cursor = page["next_cursor"]
        if page["caught_up"]:
            break
        assert page["records"] and cursor == page["records"][-1]["cursor"]
    got = [r for p in pages for r in p["records"]]
    # once each, in feed order (batches may commit in any order: ingest workers race)
    assert sorted(r["seq"] for r in got) == list(range(1, 18))
    cursors = [int(r["cursor"]) for r in got]
    assert cursors == sorted(set(cursors))
    assert all(r["payload"] == "x" * (3000 if r["seq"] <= 10 else 40_000 if r["seq"] == 11
                                      else 5000) for r in got)
    for page in pages:
        records = page["records"]
        assert len(records) <= 1 or sum(map(size_of, records)) <= BUDGET
    assert [[r["seq"] for r in p["records"]] for p in pages if len(p["records"]) == 1
            and p["records"][0]["seq"] == 11]  # the 40 KB record: a page of its own
    assert len(pages) >= 5  # 30 KB, 40 KB, 30 KB in pages of 16 KiB
    marks = [m for p in pages for m in p["completeness"]]
    assert marks[-1]["watermark"] == 17


async def test_an_ndjson_stream_reads_by_the_byte_budget(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """16 MiB of 512 KiB records streamed as NDJSON with a 1 MiB page budget: every
    record once, in order, and the API (in this process) never holds more than half
    the stream's data at once (a page of records bounded by count alone holds all of
    it, several times over: rows, decoded payloads, lines)."""
    n, size = 32, 512 * 1024
    async with control_plane(tmp_path, nats_server.url, pg_dsn, read_requires_token=True,
                             page_max_bytes=1024 * 1024) as plane:
        await publish(plane.nats_url, "big", [[_record(s, size)] for s in range(1, n + 1)])
        await wait_for_records(pg_dsn, n, timeout=60)
        seqs: list[int] = []
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            async with plane.http.stream("GET", "/v1/records", timeout=60,
                                         params={"format": "ndjson"}) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    item = json.loads(line)
                    if "seq" in item:
                        assert len(item["payload"]) == size
                        seqs.append(item["seq"])
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    assert sorted(seqs) == list(range(1, n + 1))  # once each (in feed order)
    assert peak < n * size // 2, f"{peak / 2**20:.1f} MiB held at once"
