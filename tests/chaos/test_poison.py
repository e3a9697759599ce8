"""Poison input under load: refused at the edge, or isolated to the record in the
cloud; no acknowledged record of anyone else is lost, delayed for good or duplicated
(issue 10, sections 0 and 1)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import httpx
import msgspec
import nats
import pytest

from broker.errors import InvalidInput
from broker.protocol.wire import CT_JSON, Batch, Record, encode_batch
from edge_bridge.sdk import EdgeClient
from tests.chaos.harness import ChaosSystem, Identity, Load
from tests.helpers import until

pytestmark = pytest.mark.chaos

TS = 1_700_000_000_000_000
JSON_POISON = [
    {"payload": 1, "ts": -9_223_000_000_000},
    {"payload": 1, "ts": 1e300},
    {"payload": {"a": "\u0000"}},
    {"payload": 1, "key": "k\u0000"},
]
MSGPACK_POISON = [[-(2**63), CT_JSON, b"1"], [1.5e15, CT_JSON, b"1"], [TS, CT_JSON, b"{"]]
SDK_POISON = [
    {"payload": {"a": "\x00"}},
    {"payload": 1, "ts": 1e13},
    {"payload": 1, "key": "\x00"},
    {"payload": 1, "ts": float("inf")},
]


async def _poison_producer(system: ChaosSystem, edge: str, stop: asyncio.Event) -> dict[str, int]:
    """Sends poison through the ingress (JSON and MessagePack) and the SDK, on the
    load's own stream, until ``stop``; counts how each attempt was refused."""
    counts = {"http_4xx": 0, "http_other": 0, "sdk_refused": 0, "sdk_accepted": 0}
    url = system.bridges[edge].url
    seq = itertools.count()
    async with (
        httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as http,
        EdgeClient(url, linger_ms=5) as sdk,
    ):
        while not stop.is_set():
            for bad in JSON_POISON:
                resp = await http.post("/v1/streams/s1/records",
                                       json={"records": [{"payload": {"ok": 1}}, bad]})
                counts["http_4xx" if 400 <= resp.status_code < 500 else "http_other"] += 1
            for raw in MSGPACK_POISON:
                body = msgspec.msgpack.encode({"producer": "poison", "request_seq": next(seq),
                                               "records": [[TS, CT_JSON, b"2"], raw]})
                resp = await http.post("/v1/streams/s1/records", content=body,
                                       headers={"content-type": "application/msgpack"})
                counts["http_4xx" if 400 <= resp.status_code < 500 else "http_other"] += 1
            for bad in SDK_POISON:
                try:
                    sdk.publish("s1", bad["payload"], key=bad.get("key"), ts=bad.get("ts"))
                    counts["sdk_accepted"] += 1
                except InvalidInput:
                    counts["sdk_refused"] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
    return counts


async def test_poison_through_the_ingress_and_the_sdk_never_blocks_other_producers(
    system: ChaosSystem,
) -> None:
    """One producer sends poison records through the ingress (JSON and MessagePack)
    and the SDK, on the same stream two load producers write to: every poison attempt
    is refused at the edge with a 4xx or an SDK exception, never stored; every record
    the load got acknowledged commits, and no stream is left with missing seqs."""
    stop = asyncio.Event()
    async with Load(system) as load:
        poisoner = asyncio.create_task(_poison_producer(system, "edge-a", stop))
        await load.wait_acked(6_000, timeout=60)
        stop.set()
        counts = await poisoner
    recover = await system.quiesce(load)
    missing = await system._fetch("SELECT sum(missing_records)::int8 AS n FROM v_completeness")
    letters = await system._fetch("SELECT count(*) AS n FROM dead_letters")
    outcome = await system.reconcile(
        "poison via ingress + SDK beside live producers", load, recover_s=recover,
        notes=f"{counts['http_4xx']} poison requests answered 4xx, {counts['sdk_refused']} "
        f"refused by the SDK; 0 stored, 0 dead letters needed",
    )
    assert outcome.lost == 0 and outcome.duplicated == 0, outcome
    assert counts["http_other"] == 0 and counts["sdk_accepted"] == 0, counts
    assert counts["http_4xx"] > 0 and counts["sdk_refused"] > 0, counts
    assert missing[0]["n"] == 0 and letters[0]["n"] == 0


@pytest.mark.chaos_ci
async def test_one_bad_record_in_the_middle_of_a_batch_is_isolated(system: ChaosSystem) -> None:
    """Under load, a batch of 2,000 records whose middle record PostgreSQL refuses (a
    CHECK the validator does not know) and one whose middle record the validator
    refuses: every other record of both commits, each bad record is dead-lettered with
    its identity, and both streams' watermarks reach their last seq."""
    await system._fetch("ALTER TABLE records ADD CONSTRAINT chaos_no_forbidden "
                        "CHECK (key IS DISTINCT FROM 'forbidden')")
    injected: dict[Identity, str] = {}
    async with Load(system) as load:
        await load.wait_acked(2_000)
        nc = await nats.connect(system.nats.url)
        try:
            js = nc.jetstream()
            for stream, bad in (("drift", Record(TS, CT_JSON, b'{"uid": "x"}', "forbidden")),
                                ("invalid", Record(TS, CT_JSON, b'{"uid": "\\u0000"}'))):
                records = []
                for i in range(2_000):
                    uid = f"inject:{stream}:{i}"
                    records.append(Record(TS, CT_JSON, msgspec.json.encode({"uid": uid})))
                    injected[("edge-b", stream, 77, i + 1)] = uid
                records[999] = bad
                del injected[("edge-b", stream, 77, 1000)]
                data, _ = encode_batch(Batch(1, "edge-b", stream, 77, 1, records))
                await js.publish(f"es.rec.edge-b.{stream}", data)
        finally:
            await nc.close()
        await load.wait_acked(len(load.acked) + 2_000)
    load.acked.update(injected)
    recover = await system.quiesce(load)

    async def isolated() -> list[object] | None:
        rows = await system._fetch(
            "SELECT stream, seq, kind, reason FROM dead_letters ORDER BY stream")
        return rows if len(rows) == 2 else None

    letters = await until(isolated, timeout=30, message="bad records not dead-lettered")
    progress = await system._fetch(
        "SELECT stream, watermark, dead_lettered_records, missing_records FROM v_completeness "
        "WHERE edge_id = 'edge-b' AND stream IN ('drift', 'invalid') ORDER BY stream")
    outcome = await system.reconcile(
        "one bad record mid-batch (PostgreSQL rule + validator)", load, recover_s=recover,
        notes="2 batches of 2,000 beside the load, record 1000 of each bad: 1,999 + 1,999 "
        "committed, 2 dead-lettered with identity, watermarks 2,000",
    )
    assert outcome.lost == 0 and outcome.duplicated == 0, outcome
    assert [(r["stream"], r["seq"], r["kind"]) for r in letters] == [  # type: ignore[index]
        ("drift", 1000, "record"), ("invalid", 1000, "record")]
    assert [tuple(r) for r in progress] == [("drift", 2000, 1, 0), ("invalid", 2000, 1, 0)]
