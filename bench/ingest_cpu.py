"""The ingest's own CPU per group, fan-in against bulk, without the drains' scheduling noise.

``python -m bench.ingest_cpu [--rounds R]`` writes groups of 16,000 records (new seqs
each, payloads from the bench's pool) two ways, alternating: as a fleet's 1,600
10-record batches (2,000 edges x 2 streams, scenario 7's fan-in) and as one edge's 8
2,000-record batches (its bulk), through the ingest's own code, in this process:

- **fetch**: the worker's fetch of the group from the records stream of a real
  nats-server (pull requests, the deliveries read by :mod:`cloud_ingest.direct_delivery`,
  each message's records read from its ``Nats-Msg-Id`` for the group's budget). The
  group is published to the stream before, untimed;
- **decode**: the worker's decode and validation of the group;
- **commit**: the worker's write (one transaction into a real PostgreSQL), its acks
  (to a real nats-server) and its watermark notes;
- **watermarks**: the publisher writing the group's watermarks (KV puts);
- **free**: the group's objects freed, and the cyclic GC's pass over the young
  generation that the worker's pause owed (:mod:`cloud_ingest.gc_pausing`).

The stages are the worker's own methods, called one by one (``_fetch_group``,
``_decode_part``, ``_commit``, the publisher's ``_flush``): internals, which
tests/integration/test_bench_smoke.py runs this script against. Each stage is timed
in this process's CPU time (``time.process_time``), and the
PostgreSQL backend's CPU over the commit from its ``/proc/<pid>/schedstat`` (Linux,
the database on this machine). Nothing else shares the work, and each fan-in group is
read against a bulk group timed in the same minute, so what a fan-in message costs
beyond its records moves far less than scenario 7's ratio (three processes on two
cores, ±10 % from run to run): a microsecond per message shows in a few runs, taken in
turn with the code it is compared with (the machine's own speed still drifts). The
table's last column is that difference per message: what the fan-in pays for being many
small batches, stage by stage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from nats.aio.msg import Msg
from rich.console import Console
from rich.table import Table

from bench.data import Pool
from bench.fleet_driver import fanin_batches
from bench.scenarios.fleet import preload
from broker.logs import configure_logging
from broker.pg_connecting import connected
from broker.protocol.topology import Topology
from broker.protocol.wire import WIRE_VERSION, Batch
from broker.runtime.embedded_nats import EmbeddedNats
from broker.runtime.embedded_postgres import EmbeddedPostgres
from broker.settings import IngestSettings
from cloud_ingest.direct_delivery import DeliveringClient
from cloud_ingest.gc_pausing import held_gc
from cloud_ingest.ingesting import RecordsConsumer, init_connection
from cloud_ingest.metrics import IngestMetrics
from cloud_ingest.pooling import close_pool, connect_pool
from cloud_ingest.pulling import Puller
from cloud_ingest.schema import migrate
from cloud_ingest.watermarks import WatermarkPublisher

__all__ = ["BULK", "FAN_IN", "GROUP_RECORDS", "STAGES", "main", "measure"]

FAN_IN = "fan-in (1,600 x 10 records)"
BULK = "bulk (8 x 2,000 records)"
STAGES = ("fetch", "decode", "commit", "watermarks", "free", "PostgreSQL (commit)")
GROUP_RECORDS = 16_000
"""Records per group: the ingest's default ``group_max_records``."""
_EDGES = 2_000


def _groups(pool: Pool, rounds: int) -> Iterator[tuple[str, list[Batch]]]:
    """``rounds`` groups of each shape, alternating, every record new (seqs go on)."""
    fan = fanin_batches(pool, _EDGES, GROUP_RECORDS * rounds, 10)
    per = len(fan) // rounds
    source = list(pool.records(GROUP_RECORDS))
    for r in range(rounds):
        yield FAN_IN, fan[r * per:(r + 1) * per]
        first = 1 + r * GROUP_RECORDS
        yield BULK, [Batch(WIRE_VERSION, "edge-bulk", "telemetry", 7, first + i,
                           source[i:i + 2_000]) for i in range(0, GROUP_RECORDS, 2_000)]


def _backend_cpu_s(pid: int) -> float:
    """CPU seconds of PostgreSQL backend ``pid`` so far (its ``schedstat``)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


async def _rounds(work: Path, rounds: int) -> dict[str, dict[str, list[float]]]:
    topology = Topology()
    spent: dict[str, dict[str, list[float]]] = {
        shape: {stage: [] for stage in STAGES} for shape in (FAN_IN, BULK)}
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(
            EmbeddedNats(work / "nats", log_file=work / "nats.log"))
        pg = await stack.enter_async_context(EmbeddedPostgres(work / "pg"))
        dsn = await pg.create_database("ingest_cpu")
        async with connected(dsn) as conn:
            await migrate(conn)
        db = await connect_pool(dsn, size=1, init=init_connection)
        stack.push_async_callback(close_pool, db)
        nc = DeliveringClient()
        await nc.connect(nats.url)
        stack.push_async_callback(nc.close)
        js = nc.jetstream()
        await topology.ensure_all(js)
        async with db.acquire() as conn:
            backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
        metrics = IngestMetrics()
        publisher = WatermarkPublisher(nc, topology, metrics=metrics)
        settings = IngestSettings(postgres_dsn=dsn, port=0)
        consumer = RecordsConsumer(nc=nc, js=js, pool=db, topology=topology, metrics=metrics,
                                   settings=settings, on_committed=publisher.note)
        await consumer.ensure_consumer()
        puller = Puller(nc, topology.records_stream, settings.consumer)
        await puller.start()
        stack.push_async_callback(puller.close)
        for shape, wire in _groups(Pool.generate(), rounds):
            await preload(js, topology, wire)
            took = spent[shape]
            t0 = time.process_time()
            msgs: list[Msg] = []
            while len(msgs) < len(wire):  # a fetch may end early on its fill timeout
                if not (got := await consumer._fetch_group(puller, idle=False)):
                    raise RuntimeError(f"fetched {len(msgs)} of {len(wire)} messages")
                msgs += got
            t1 = time.process_time()
            with held_gc():  # as the worker holds it over a group's decode and commit
                part, _, _ = consumer._decode_part(msgs, 0, None)
                t2 = time.process_time()
                pg0 = _backend_cpu_s(backend)
                await consumer._commit(part)
                pg1 = _backend_cpu_s(backend)
                t3 = time.process_time()
                await publisher._flush()  # the publisher runs beside the workers' holds
                t4 = time.process_time()
                del part, msgs
            gc.collect(0)  # the young generation's pass the hold owed: what the next
            # allocation after it would run, here where it can be timed
            t5 = time.process_time()
            for stage, seconds in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4,
                                               pg1 - pg0),
                                      strict=True):
                took[stage].append(seconds)
        async with connected(dsn) as conn:  # every group was new records, written once
            rows = int(await conn.fetchval("SELECT count(*) FROM records"))
        if rows != 2 * rounds * GROUP_RECORDS:
            raise RuntimeError(f"{rows} rows for {2 * rounds * GROUP_RECORDS} records")
    return spent


async def measure(rounds: int) -> dict[str, dict[str, float]]:
    """Median CPU seconds per group, per shape and stage, over ``rounds`` groups of each
    (the first of each left out: warm-up)."""
    with tempfile.TemporaryDirectory(prefix="edgesync-ingest-cpu-") as tmp:
        work = Path(tmp)
        await asyncio.to_thread(work.chmod, 0o755)  # the PostgreSQL user reaches its cluster
        spent = await _rounds(work, rounds + 1)
    return {shape: {stage: statistics.median(v[1:]) for stage, v in stages.items()}
            for shape, stages in spent.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20,
                        help="groups of each shape, alternating; medians are shown")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    configure_logging("warning", "console")
    result = asyncio.run(measure(args.rounds))
    fan, bulk = result[FAN_IN], result[BULK]
    messages = GROUP_RECORDS // 10
    table = Table(title=f"The ingest's CPU per group of {GROUP_RECORDS:,} records "
                        f"(median of {args.rounds} alternating groups of each shape)")
    for col in ("stage", f"{FAN_IN}, ms", f"{BULK}, ms", "fan-in extra, µs per message"):
        table.add_column(col, justify="right")
    for stage in (*STAGES, "ingest, all stages"):
        if stage == "ingest, all stages":
            f, b = (sum(d[s] for s in STAGES[:-1]) for d in (fan, bulk))
        else:
            f, b = fan[stage], bulk[stage]
        table.add_row(stage, f"{f * 1e3:.2f}", f"{b * 1e3:.2f}",
                      f"{(f - b) / messages * 1e6:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
