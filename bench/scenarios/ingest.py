"""Scenario 1: ingest, JetStream -> PostgreSQL, exactly once; beside its baselines.

- *edgesync*: N records pre-loaded into ``ES_RECORDS`` as the shipper's batches
  (published directly with ``broker.protocol.wire.encode_batch``); then the ingest
  starts as its own process (``python -m broker ingest``) and is timed from
  its ``ingest_started`` log line to the moment ``committed_ranges`` counts N.
- *replay*: a second ingest process with a new durable consumer receives the
  same batches again into the database that holds them (all duplicates);
  timed until the consumer has nothing pending or unacknowledged.
- *ceiling (a)*: asyncpg binary ``copy_records_to_table`` of the same rows
  into ``records`` of a fresh database (same schema, same primary key), in
  ``ceiling_group``-row transactions, on 1, 2 and 4 connections in parallel
  (each its share of the transactions); the best of the three is the ceiling.
  No NATS, no de-duplication. Only the COPYs are timed.
- *naive (b)*: one JSON record per NATS message, pull fetch, one
  ``INSERT ... ON CONFLICT DO NOTHING`` per record (autocommit), ack each.
- *framework (c)*: FastStream's NATS JetStream pull subscriber (batches of
  500) and asyncpg ``executemany`` of ``INSERT ... ON CONFLICT DO NOTHING``;
  skipped, with a note, when FastStream is not installed.

All baselines get the ingest's own asyncpg codecs
(:func:`cloud_ingest.ingesting.init_connection`: jsonb and timestamptz pass
through as bytes and integers), so the comparison is of the write strategy,
not of codecs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Final

import asyncpg
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from bench.data import EDGE, STREAM, Pool, batches, json_decoder, json_message, json_msg_id
from bench.driving import committed_records, wait_for
from bench.env import BenchEnv, connect_nats
from bench.profiles import Profile
from bench.results import ScenarioResult
from broker.pg_connecting import connected
from broker.protocol.topology import Topology
from broker.protocol.wire import encode_batch, msg_id
from cloud_ingest.ingesting import init_connection
from cloud_ingest.writing import COLUMNS as WRITER_COLUMNS
from cloud_ingest.writing import GroupWriter

__all__ = [
    "CEILING_CONNECTIONS",
    "COLUMNS",
    "FRAMEWORK_BATCH",
    "INSERT_ONE",
    "JSON_STREAM",
    "JSON_SUBJECT",
    "KEY",
    "TITLE",
    "framework_available",
    "run",
]

KEY: Final = "ingest"
TITLE: Final = "1. ingest JetStream→PostgreSQL"

COLUMNS: Final = WRITER_COLUMNS
"""The columns the ingest writes (cloud_ingest.writing), in its order."""
INSERT_ONE: Final = (
    "INSERT INTO records (stream_key, seq, event_time, received_at, key, payload) "
    "VALUES (es_stream_key($1, $2, $3), $4, $5, $6, $7, $8)"
)
"""One row per statement; (edge, stream, epoch) -> its id as the ingest stores it."""
JSON_STREAM: Final = "BENCH_JSON"
JSON_SUBJECT: Final = f"bench.json.{EDGE}.{STREAM}"
FRAMEWORK_BATCH: Final = 500


async def run(env: BenchEnv, profile: Profile, pool: Pool,
              step: Callable[[str], None]) -> ScenarioResult:
    res = ScenarioResult(KEY, TITLE)
    n = profile.ingest_records
    step(f"encoding {n:,} records into batches")
    wire_batches = batches(pool, n)
    res.data["records"] = n
    res.data["batches"] = len(wire_batches)

    step("ceiling (a): asyncpg binary COPY")
    ceiling = await _ceiling(env, wire_batches, profile.ceiling_group, res)
    async with env.nats_server("ingest") as nats_server, env.database("ingest") as dsn:
        nc = await connect_nats(nats_server.url)
        try:
            js = nc.jetstream(timeout=30)
            topology = Topology()
            await topology.ensure_streams(js)
            step(f"pre-loading {len(wire_batches)} batches into {topology.records_stream}")
            await _preload_batches(js, topology, wire_batches)
            step("edgesync ingest (own process) draining the stream")
            ours = await _ingest(env, nats_server, dsn, n, res)
            step("edgesync ingest, replay: every record a duplicate")
            replay = await _replay(env, nats_server, js, dsn, n=n, messages=len(wire_batches),
                                   res=res)
            m = max(profile.naive_records, profile.framework_records)
            step(f"pre-loading {m:,} JSON-per-record messages")
            await _preload_json(js, pool, m)
            step(f"naive (b): INSERT per record, {profile.naive_records:,} records")
            naive = await _naive(env, nats_server, js, profile.naive_records, res)
            step(f"framework (c): FastStream + executemany, {m:,} records")
            framework = await _framework(env, nats_server, m, res)
        finally:
            await nc.close()

    res.add("edgesync ingest, no duplicates", ours, "rec/s",
            f"{n:,} records in {len(wire_batches)} batches; ingest as its own process")
    by_k = res.data["ceiling_by_connections"]
    res.add("ceiling (a): asyncpg binary COPY", ceiling, "rec/s",
            "best of 1/2/4 parallel connections ("
            + ", ".join(f"{k}: {v:,.0f}" for k, v in by_k.items())
            + f"), {profile.ceiling_group:,}-row COPY transactions, rows prepared")
    res.add("naive (b): INSERT + ack per record", naive, "rec/s",
            f"{profile.naive_records:,} JSON messages")
    if framework is None:
        res.add("framework (c): FastStream + executemany", None, "rec/s",
                "skipped: FastStream not installed (pip install -e '.[bench]')")
    else:
        res.add("framework (c): FastStream + executemany", framework, "rec/s",
                f"{m:,} JSON messages, pull batches of {FRAMEWORK_BATCH}")
    res.add("edgesync ingest, replay (all duplicates)", replay, "rec/s",
            "same batches again, new durable consumer, same database")
    r_ceiling = ours / ceiling
    r_naive = ours / naive
    r_replay = replay / ceiling
    res.add("edgesync / ceiling", r_ceiling, "x")
    res.add("edgesync / naive", r_naive, "x")
    res.add("edgesync / framework", None if framework is None else ours / framework, "x")
    res.add("replay / ceiling", r_replay, "x")
    res.check("ingest, no duplicates", "≥ 0.8 x ceiling (a)", f"{r_ceiling:.2f}x",
              r_ceiling >= 0.8)
    res.check("ingest, no duplicates", "≥ 10 x naive (b)", f"{r_naive:.1f}x", r_naive >= 10)
    if framework is None:
        res.check("ingest, no duplicates", "≥ 2 x framework (c)", "skipped (no FastStream)",
                  None)
    else:
        r_fw = ours / framework
        res.check("ingest, no duplicates", "≥ 2 x framework (c)", f"{r_fw:.2f}x", r_fw >= 2)
    res.check("ingest, all duplicates", "≥ 0.8 x ceiling (a)", f"{r_replay:.2f}x",
              r_replay >= 0.8)
    res.data.update(ingest_rps=ours, ceiling_rps=ceiling, naive_rps=naive,
                    framework_rps=framework, replay_rps=replay)
    return res


CEILING_CONNECTIONS: Final = (1, 2, 4)


async def _ceiling(env: BenchEnv, wire_batches: list[Any], group: int,
                   res: ScenarioResult) -> float:
    """The best of 1, 2 and 4 connections COPYing the same rows in parallel."""
    received_us = time.time_ns() // 1000
    named = [row for b in wire_batches for row in GroupWriter.rows(b, received_us)]
    rates: dict[int, float] = {}
    for k in CEILING_CONNECTIONS:
        async with env.database(f"ceiling{k}") as dsn:
            conns = [await asyncpg.connect(dsn) for _ in range(k)]
            try:
                for conn in conns:
                    await init_connection(conn)
                # the rows as stored: (edge, stream, epoch) as its stream_keys id
                ids = await GroupWriter(Topology()).stream_keys(conns[0],
                                                                {r[:3] for r in named})
                rows = [(r[3], r[4], r[5], ids[r[:3]], *r[6:]) for r in named]
                chunks = [rows[i:i + group] for i in range(0, len(rows), group)]

                async def copy(conn: asyncpg.Connection, mine: list[list[Any]]) -> None:
                    for chunk in mine:
                        async with conn.transaction():
                            await conn.copy_records_to_table("records", records=chunk,
                                                             columns=COLUMNS)

                meter = env.cpu_meter(None)
                meter.start()
                started = time.perf_counter()
                await asyncio.gather(*(copy(c, chunks[i::k]) for i, c in enumerate(conns)))
                seconds = time.perf_counter() - started
                res.cpu_seconds[f"ceiling, {k} connection{'s' if k > 1 else ''}"] = {
                    **meter.stop(), "wall": round(seconds, 2)}
                assert await conns[0].fetchval("SELECT count(*) FROM records") == len(rows)
            finally:
                for conn in conns:
                    await conn.close()
        rates[k] = len(rows) / seconds
    res.data["ceiling_by_connections"] = rates
    return max(rates.values())


async def _preload_batches(js: JetStreamContext, topology: Topology,
                           wire_batches: list[Any]) -> None:
    subject = topology.records_subject(EDGE, STREAM)
    acks = []
    for b in wire_batches:
        body, headers = encode_batch(b)
        headers["Nats-Msg-Id"] = msg_id(b.edge, b.stream, b.epoch, b.first_seq, b.last_seq)
        acks.append(await js.publish_async(subject, body, headers=headers))
    await asyncio.gather(*acks)


async def _ingest(env: BenchEnv, nats_server: Any, dsn: str, n: int,
                  res: ScenarioResult) -> float:
    ingest = env.ingest("drain", nats_server.url, dsn)
    async with connected(dsn) as conn:
        async with env.statement_times(dsn, res.data, "edgesync ingest"):
            await ingest.start()
            meter = env.cpu_meter(nats_server, ingest=ingest)
            meter.start()

            async def all_committed() -> bool:
                return await committed_records(conn) >= n

            done = await wait_for(all_committed, timeout=600, interval=0.02,
                                  what=f"{n} records committed")
            res.cpu_seconds["edgesync ingest"] = {**meter.stop(),
                                                  "wall": round(meter.wall_s, 2)}
        started = ingest.started_at("ingest_started")
        assert started is not None, "ingest_started not found in the ingest's log"
        rows = await conn.fetchval("SELECT count(*) FROM records")
        assert rows == n, f"exactly-once violated: {rows} rows for {n} records"
        res.data["ingest_memory_mib"] = ingest.memory()
        res.data["ingest_seconds"] = done - started
        await ingest.stop()
    return n / (done - started)


async def _replay(env: BenchEnv, nats_server: Any, js: JetStreamContext, dsn: str, *, n: int,
                  messages: int, res: ScenarioResult) -> float:
    ingest = env.ingest("replay", nats_server.url, dsn, consumer="replay")
    try:
        await ingest.start()
        meter = env.cpu_meter(nats_server, ingest=ingest)
        meter.start()
        stream = Topology().records_stream

        async def drained() -> bool:
            info = await js.consumer_info(stream, "replay")
            return (info.num_pending == 0 and info.num_ack_pending == 0
                    and info.ack_floor is not None and (info.ack_floor.stream_seq or 0) >= messages)

        done = await wait_for(drained, timeout=600, interval=0.02, what="replay acked")
        res.cpu_seconds["edgesync replay"] = {**meter.stop(), "wall": round(meter.wall_s, 2)}
        started = ingest.started_at("ingest_started")
        assert started is not None, "ingest_started not found in the ingest's log"
        async with connected(dsn) as conn:
            rows = await conn.fetchval("SELECT count(*) FROM records")
        assert rows == n, f"exactly-once violated on replay: {rows} rows for {n} records"
        res.data["replay_seconds"] = done - started
    finally:
        await ingest.stop()
    return n / (done - started)


async def _preload_json(js: JetStreamContext, pool: Pool, m: int) -> None:
    await js.add_stream(StreamConfig(
        name=JSON_STREAM, subjects=["bench.json.>"], storage=StorageType.FILE,
        duplicate_window=300.0,
    ))
    acks = []
    for seq, rec in enumerate(pool.records(m), 1):
        acks.append(await js.publish_async(
            JSON_SUBJECT, json_message(rec, seq), headers={"Nats-Msg-Id": json_msg_id(seq)}
        ))
    await asyncio.gather(*acks)


async def _naive(env: BenchEnv, nats_server: Any, js: JetStreamContext, m: int,
                 res: ScenarioResult) -> float:
    async with env.database("naive") as dsn, connected(dsn) as conn:
        await init_connection(conn)
        sub = await js.pull_subscribe(JSON_SUBJECT, durable="naive", stream=JSON_STREAM)
        meter = env.cpu_meter(nats_server)
        meter.start()
        started = time.perf_counter()
        done = 0
        while done < m:
            for msg in await sub.fetch(min(100, m - done), timeout=10):
                rec = json_decoder.decode(msg.data)
                _, _, edge, stream = msg.subject.split(".")
                await conn.execute(INSERT_ONE, edge, stream, rec.epoch, rec.seq, rec.ts,
                                   time.time_ns() // 1000, rec.key, bytes(rec.payload))
                await msg.ack()
                done += 1
        seconds = time.perf_counter() - started
        res.cpu_seconds["naive"] = {**meter.stop(), "wall": round(seconds, 2)}
        await sub.unsubscribe()
        assert await conn.fetchval("SELECT count(*) FROM records") == m
    return m / seconds


def framework_available() -> bool:
    """True when FastStream (with its NATS support) is installed: the ``bench`` extra."""
    try:
        import faststream.nats  # noqa: F401
    except ImportError:
        return False
    return True


async def _framework(env: BenchEnv, nats_server: Any, m: int,
                     res: ScenarioResult) -> float | None:
    if not framework_available():
        res.data["framework_skipped"] = "FastStream is not installed"
        return None
    from bench.scenarios import _faststream

    async with env.database("framework") as dsn:
        meter = env.cpu_meter(nats_server)
        meter.start()
        seconds = await _faststream.consume(nats_server.url, dsn, stream=JSON_STREAM,
                                            subject=JSON_SUBJECT, records=m,
                                            batch=FRAMEWORK_BATCH)
        res.cpu_seconds["framework"] = {**meter.stop(), "wall": round(seconds, 2)}
        async with connected(dsn) as conn:
            assert await conn.fetchval("SELECT count(*) FROM records") == m
    return m / seconds

