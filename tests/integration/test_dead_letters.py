"""Bad messages on the records stream become dead letters; nothing blocks the stream."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import nats

from broker.protocol.wire import CT_JSON, Batch, Record, encode_batch
from broker.runtime.embedded_nats import EmbeddedNats
from tests.helpers import until
from tests.integration.harness import running_ingest, wait_for_records


def batch(edge: str, stream: str, first: int, n: int, payload: bytes = b"{}") -> Batch:
    return Batch(1, edge, stream, 42, first, [Record(0, CT_JSON, payload) for _ in range(n)])


async def dead_letters(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch("SELECT subject, reason, data FROM dead_letters ORDER BY id")
    finally:
        await conn.close()


async def test_garbage_and_mismatched_batches_are_dead_lettered_and_traffic_flows(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """Garbage, a batch on another edge's subject, and a poison payload each get a
    dead-letter row with a reason; the valid batches around them are committed."""
    async with running_ingest(pg_dsn, nats_server.url):
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        try:
            good1, _ = encode_batch(batch("e1", "s", 1, 10))
            await js.publish("es.rec.e1.s", good1)
            await js.publish("es.rec.e1.s", b"\x00\xffnot msgpack at all")
            spoof, _ = encode_batch(batch("e2", "s", 1, 5))
            await js.publish("es.rec.e1.s", spoof)  # e1's subject carrying e2's batch
            poison, _ = encode_batch(batch("e1", "s", 11, 3, payload=b'{"bad": "\\u0000"}'))
            await js.publish("es.rec.e1.s", poison)  # valid envelope, jsonb refuses \u0000
            bad_json, _ = encode_batch(batch("e1", "s", 14, 1, payload=b"{not json"))
            await js.publish("es.rec.e1.s", bad_json)
            good2, _ = encode_batch(batch("e1", "s", 15, 10))
            await js.publish("es.rec.e1.s", good2)
        finally:
            await nc.close()
        await wait_for_records(pg_dsn, 20)

        async def four_dead_letters() -> list[asyncpg.Record] | None:
            rows = await dead_letters(pg_dsn)
            return rows if len(rows) >= 4 else None

        rows = await until(four_dead_letters, timeout=15)
    reasons = [r["reason"] for r in rows]
    assert len(rows) == 4, reasons
    assert any("malformed batch" in r for r in reasons)
    assert any("edge 'e2'" in r and "subject 'es.rec.e1.s'" in r for r in reasons)
    assert sum("rejected by PostgreSQL" in r for r in reasons) == 2
    assert {r["data"] for r in rows} >= {b"\x00\xffnot msgpack at all", poison, bad_json}
    assert await _seqs(pg_dsn) == list(range(1, 11)) + list(range(15, 25))


async def _seqs(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r[0] for r in await conn.fetch("SELECT seq FROM records ORDER BY seq")]
    finally:
        await conn.close()
