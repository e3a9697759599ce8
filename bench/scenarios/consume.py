"""Scenario 8: cloud analytics, consuming the committed records; and the data at rest.

- *load*: N records committed through the ingest's own writer
  (:class:`cloud_ingest.writing.GroupWriter`, in-process, groups of 16,000 records
  as the ingest sizes them), so ``records`` and ``feed_commits`` hold what a real
  ingest leaves. Timed: that is the *ingest, partitioned* figure.
- *SDK consumer*: a :class:`broker.feed.Subscription` from ``earliest``, batches of
  5,000, every record decoded (identity, times, key, headers, payload as Python
  objects), until it has all N; checkpoint committed at the end.
- *ceiling*: ``COPY (SELECT <the same columns> FROM records JOIN stream_keys) TO
  STDOUT`` (binary) of the same rows (identity by name, the stored payload text),
  bytes handed to a callback that drops them: no decoding at all.
- *naive*: what users write instead: a polling loop over ``v_records`` of ``SELECT ... WHERE
  (received_at, edge_id, epoch, seq) > ($last...) ORDER BY ... LIMIT 1000`` (a
  keyset; the literal ``received_at > $last`` skips the rows of a group that share
  one), payloads decoded like the SDK's, over the first M records.
- *latency*: a writer commits 100-record groups at the profile's rate (10,000
  records/s in ``full``) while a subscription follows ``latest``: for each record,
  time from its group's COMMIT returning to the subscription yielding it; p50/p99.
- *unpartitioned*: the same load into one plain table (the same columns, the
  primary key on the identity, as before 008), same writer: ingest throughput and
  bytes per row.
  The two layouts live in two databases and are loaded in alternating rounds,
  each emptied first; as the SDK and the ceiling, medians of ``ROUNDS``.
- *bytes per record*: ``pg_total_relation_size`` of every partition of ``records``
  (heap, TOAST, indexes) / rows, beside the payload's JSON size: the bytes the
  producer sent (compact JSON), not a re-serialisation.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
import msgspec
from nats.aio.msg import Msg

from bench.data import Pool, batches
from bench.env import BenchEnv
from bench.profiles import Profile
from bench.results import ScenarioResult
from broker.feed import Subscription
from broker.pg_connecting import connected
from broker.protocol.topology import Topology
from broker.protocol.wire import Batch, encode_batch
from cloud_ingest.ingesting import init_connection
from cloud_ingest.writing import GroupWriter

__all__ = ["GROUP_RECORDS", "KEY", "ROUNDS", "TITLE", "run"]

KEY: Final = "consume"
TITLE: Final = "8. consume the committed records; data at rest"
ROUNDS: Final = 3
"""Alternating rounds of each compared pair (medians reported)."""
GROUP_RECORDS: Final = 16_000
"""Records per transaction of the load (the ingest's group_max_records)."""
_CEILING = """
SELECT k.edge_id, k.stream, k.epoch, r.seq, r.event_time, r.received_at, r.key, r.headers,
       r.payload, r.payload_raw
FROM records r JOIN stream_keys k ON k.id = r.stream_key
"""
"""The rows the SDK yields, as stored (migration 010): the identity by name (the key's
id joined to ``stream_keys``), the payload's JSON text, no conversion."""
_NAIVE = """
SELECT edge_id, stream, epoch, seq, event_time, received_at, key, headers, payload,
       payload_is_binary
FROM v_records
WHERE (received_at, edge_id, epoch, seq) > ($1, $2, $3, $4)
ORDER BY received_at, edge_id, epoch, seq LIMIT 1000
"""
_json = msgspec.json.Decoder()


def _msgs(wire: list[Batch]) -> list[Msg]:
    topology = Topology()
    out = []
    for b in wire:
        body, headers = encode_batch(b)
        out.append(Msg(_client=None, subject=topology.records_subject(b.edge, b.stream),  # type: ignore[arg-type]
                       data=body, headers=headers))
    return out


async def _load(dsn: str, msgs: list[Msg], *, plain: bool = False) -> float:
    """Commit ``msgs`` through the ingest's writer; returns records/s."""
    async with connected(dsn) as conn:
        await init_connection(conn)
        gw = GroupWriter(Topology())
        if plain:  # the plain table has no partitions to look for
            gw._days.add(datetime.now(UTC).date())
        decoded = [gw.decode(m) for m in msgs]
        per = max(1, GROUP_RECORDS // max(1, len(decoded[0].batch.records)
                                          if decoded[0].batch else 1))
        n = sum(len(d.batch.records) for d in decoded if d.batch)
        started = time.perf_counter()
        for i in range(0, len(decoded), per):
            await gw.write(conn, decoded[i:i + per])
        return n / (time.perf_counter() - started)


async def _unpartition(dsn: str) -> None:
    """Swap ``records`` for one plain table: the same columns (so the writer is
    unchanged), the pre-008 primary key on the identity, BRIN on received_at."""
    async with connected(dsn) as conn:
        await conn.execute("""
            DROP VIEW v_feed; DROP VIEW v_records;
            ALTER TABLE records RENAME TO records_partitioned;
            CREATE TABLE records (
                seq bigint NOT NULL, event_time timestamptz NOT NULL,
                received_at timestamptz NOT NULL, stream_key integer NOT NULL, key text,
                headers json, payload json, payload_raw bytea,
                PRIMARY KEY (stream_key, seq),
                CHECK ((payload IS NULL) <> (payload_raw IS NULL)));
            CREATE INDEX ON records USING brin (received_at);
        """)


async def _truncate(dsn: str) -> None:
    async with connected(dsn) as conn:
        await conn.execute("TRUNCATE records, committed_ranges, feed_commits")


async def _bytes_per_row(dsn: str) -> float:
    """Bytes on disk per row (heap, TOAST, indexes)."""
    async with connected(dsn) as conn:
        await conn.execute("VACUUM ANALYZE records")
        total = await conn.fetchval(
            "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits "
            "WHERE inhparent = 'records'::regclass")
        if not total:
            total = await conn.fetchval("SELECT pg_total_relation_size('records')")
        rows: int = await conn.fetchval("SELECT count(*) FROM records")
        return float(total) / rows


async def _sdk(dsn: str, n: int, name: str) -> float:
    got = 0
    started = time.perf_counter()
    async with Subscription(dsn, name, start_at="earliest", batch_size=5000) as sub:
        async for batch in sub:
            got += len(batch)
            if got >= n:
                await sub.commit()
                break
    return got / (time.perf_counter() - started)


async def _copy(dsn: str, n: int) -> float:
    async with connected(dsn) as conn:
        sink = bytearray()

        async def drop(chunk: bytes) -> None:
            sink[:] = chunk[:0]

        started = time.perf_counter()
        await conn.copy_from_query(_CEILING, output=drop, format="binary")
        return n / (time.perf_counter() - started)


async def _naive(dsn: str, m: int) -> float:
    async with connected(dsn) as conn:
        last: tuple[Any, ...] = (datetime(1970, 1, 1, tzinfo=UTC), "", 0, 0)
        got = 0
        started = time.perf_counter()
        while got < m:
            rows = await conn.fetch(_NAIVE, *last)
            if not rows:
                break
            for r in rows:  # decode as the SDK does
                _json.decode(r["payload"])
            got += len(rows)
            last = (rows[-1]["received_at"], rows[-1]["edge_id"], rows[-1]["epoch"],
                    rows[-1]["seq"])
        return got / (time.perf_counter() - started)


async def _latency(dsn: str, pool: Pool, rate: float, seconds: float, warmup: float
                   ) -> tuple[float, float, int]:
    """p50 and p99 (ms) from a group's COMMIT to the subscription yielding its rows."""
    group = 100
    wire = batches(pool, int(rate * (seconds + warmup)) + group)
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    gw = GroupWriter(Topology())
    committed: dict[int, float] = {}  # first seq of the group -> commit time
    lat: list[float] = []
    total = int(rate * (seconds + warmup)) // group * group
    measure_from = time.perf_counter() + warmup

    async def consume() -> None:
        async with Subscription(dsn, "bench-live", start_at="latest", batch_size=5000,
                                poll_s=1.0) as sub:
            got = 0
            async for batch in sub:
                now = time.perf_counter()
                for r in batch:
                    start = committed.get(r.seq - (r.seq - 1) % group)
                    if start is not None and start >= measure_from:
                        lat.append(now - start)
                got += len(batch)
                if got >= total:
                    return

    consumer = asyncio.create_task(consume())
    try:
        await asyncio.sleep(0.5)  # the subscription is at `latest` before the first commit
        records = [rec for b in wire for rec in b.records]
        interval = group / rate
        t0 = time.perf_counter()
        for k, i in enumerate(range(0, total, group)):
            part = Batch(1, "lat", "s", 1, i + 1, records[i:i + group])
            body, headers = encode_batch(part)
            msg = Msg(_client=None, subject=Topology().records_subject("lat", "s"),  # type: ignore[arg-type]
                      data=body, headers=headers)
            await gw.write(conn, [gw.decode(msg)])
            committed[i + 1] = time.perf_counter()
            delay = t0 + (k + 1) * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.wait_for(consumer, 30)
    finally:
        consumer.cancel()
        await conn.close()
    lat.sort()
    p50 = statistics.median(lat) * 1000
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
    return p50, p99, len(lat)


async def run(env: BenchEnv, profile: Profile, pool: Pool,
              step: Callable[[str], None]) -> ScenarioResult:
    res = ScenarioResult(KEY, TITLE)
    n = profile.consume_records
    m = min(n, profile.consume_naive_records)
    step(f"encoding {n:,} records into batches")
    wire = batches(pool, n)
    msgs = _msgs(wire)
    # The denominator: the JSON bytes the producer sent (compact), not a re-serialisation
    # (jsonb's text form adds a space after every ':' and ',': 198 B vs 179 B here).
    payload = sum(len(r.payload) for b in wire for r in b.records) / n
    del wire
    res.data["records"] = n
    # A shared machine's noise swamps one run of each: every pair below alternates
    # ROUNDS times and each side reports its median (ratios of medians).
    sdks: list[float] = []
    ceilings: list[float] = []
    parts: list[float] = []
    plains: list[float] = []
    async with env.database("consume") as dsn:
        step(f"load: {n:,} records through the ingest's writer (partitioned)")
        await _load(dsn, msgs)
        per_row = await _bytes_per_row(dsn)
        for r in range(ROUNDS):
            step(f"round {r + 1}/{ROUNDS}: COPY (SELECT ...) TO STDOUT, then the SDK consumer")
            ceilings.append(await _copy(dsn, n))
            sdks.append(await _sdk(dsn, n, f"bench-{r}"))
        step(f"naive: keyset polling loop over {m:,} records")
        naive = await _naive(dsn, m)
    async with env.database("consume_live") as dsn:
        step(f"latency: commits at {profile.latency_rate:,.0f} records/s, a live subscription")
        p50, p99, samples = await _latency(dsn, pool, profile.latency_rate,
                                           profile.latency_seconds, profile.latency_warmup_s)
    async with env.database("consume_part") as part, env.database("consume_plain") as plain:
        await _unpartition(plain)
        for r in range(ROUNDS):
            step(f"round {r + 1}/{ROUNDS}: load into the partitioned table, then the plain one")
            for dsn, into in ((part, parts), (plain, plains)):
                await _truncate(dsn)
                into.append(await _load(dsn, msgs, plain=dsn == plain))
        plain_row = await _bytes_per_row(plain)
    sdk, ceiling = statistics.median(sdks), statistics.median(ceilings)
    ingest_part, ingest_plain = statistics.median(parts), statistics.median(plains)
    res.data.update(sdk_rounds=sdks, ceiling_rounds=ceilings, partitioned_rounds=parts,
                    unpartitioned_rounds=plains)

    res.add("edgesync SDK consumer", sdk, "rec/s",
            f"{n:,} records from earliest, batches of 5,000, decoded; median of {ROUNDS}")
    res.add("ceiling: COPY (SELECT …) TO STDOUT", ceiling, "rec/s",
            f"binary, not decoded; median of {ROUNDS}, alternating with the SDK")
    res.add("naive: keyset polling loop, LIMIT 1000", naive, "rec/s",
            f"first {m:,} records, decoded")
    res.add("commit → consumer latency p50", p50, "ms",
            f"{profile.latency_rate:,.0f} rec/s in 100-record commits, {samples:,} samples")
    res.add("commit → consumer latency p99", p99, "ms")
    res.add("ingest writer, partitioned", ingest_part, "rec/s",
            f"in-process GroupWriter, {GROUP_RECORDS:,}-record groups; median of {ROUNDS}")
    res.add("ingest writer, unpartitioned (one plain table)", ingest_plain, "rec/s",
            f"same writer and columns, one table with the identity primary key; median of "
            f"{ROUNDS}, alternating")
    res.add("bytes on disk per record, partitioned", per_row, "B",
            "heap + TOAST + indexes of every partition / rows")
    res.add("bytes on disk per record, unpartitioned", plain_row, "B")
    res.add("payload JSON per record", payload, "B", "the bytes the producer sent")
    r_ceiling, r_naive = sdk / ceiling, sdk / naive
    r_ingest, r_bytes = ingest_part / ingest_plain, per_row / payload
    res.add("SDK / ceiling", r_ceiling, "x")
    res.add("SDK / naive", r_naive, "x")
    res.add("partitioned / unpartitioned ingest", r_ingest, "x")
    res.add("bytes per record / payload JSON", r_bytes, "x")
    res.check("SDK consumer", "≥ 0.5 x COPY ceiling", f"{r_ceiling:.2f}x", r_ceiling >= 0.5)
    res.check("SDK consumer", "≥ 5 x naive polling", f"{r_naive:.1f}x", r_naive >= 5)
    res.check("commit → consumer p99", "≤ 100 ms at 10,000 rec/s", f"{p99:.0f} ms",
              p99 <= 100 if profile.latency_rate >= 10_000 else None)
    res.check("ingest, partitioned", "within 10 % of unpartitioned", f"{r_ingest:.2f}x",
              r_ingest >= 0.9)
    res.check("bytes on disk per record", "≤ 1.6 x payload JSON", f"{r_bytes:.2f}x",
              r_bytes <= 1.6)
    return res
