"""What TLS and per-identity auth on NATS cost: the edge path and the ingest, on vs off.

``python -m bench.tls_cost [--records N]`` runs, in one process and one run,
the same work twice, against an open nats-server and against the secured one
``edgesync up`` runs (TLS, nkey identities, permissions):

- **edge path**: an SDK producer publishes N records to an in-process bridge;
  timed until every record is JetStream-acknowledged (the bridge's
  ``edgesync_records_shipped_total``);
- **ingest**: an in-process ingest (its own PostgreSQL database) drains the
  records the bridge shipped; timed until all are committed.

It prints records/s for each and the secured/open ratio. Everything shares the
machine's cores, so absolute figures follow the machine's load; the ratio,
measured in the same run, is the figure to read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from rich.console import Console
from rich.table import Table

from broker.pg_connecting import connected
from broker.runtime.embedded_nats import EmbeddedNats
from broker.runtime.embedded_postgres import EmbeddedPostgres
from broker.runtime.secured_nats import SecuredNats
from broker.settings import BridgeSettings, IngestSettings, NatsSettings, ShipperSettings
from cloud_ingest.service import Ingest
from edge_bridge.bridge import Bridge
from edge_bridge.sdk import EdgeClient

__all__ = [
    "EDGE",
    "main",
    "measure",
]

EDGE = "edge-tls"
_DEADLINE_S = 600.0


@contextlib.asynccontextmanager
async def _serving(service: Bridge | Ingest) -> AsyncIterator[None]:
    stop, ready = asyncio.Event(), asyncio.Event()
    async with service:
        task = asyncio.create_task(service.serve(stop, ready))
        await asyncio.wait_for(ready.wait(), 60)
        try:
            yield
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)


async def _until(predicate: object, what: str) -> None:
    deadline = time.monotonic() + _DEADLINE_S
    while not await predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {_DEADLINE_S} s")
        await asyncio.sleep(0.02)


async def _one(work: Path, pg: EmbeddedPostgres, *, secured: bool, records: int,
               tag: str) -> tuple[float, float]:
    """(edge-path records/s, ingest records/s) against an open or a secured server."""
    name = "secured" if secured else "open"
    async with contextlib.AsyncExitStack() as stack:
        if secured:
            server = SecuredNats(work / name, log_file=work / f"{name}-nats.log")
            server.identities.add_edge(EDGE)
            await stack.enter_async_context(server)
            edge_nats = server.settings_for("edge", EDGE)
            ingest_nats = server.settings_for("ingest")
        else:
            plain = await stack.enter_async_context(
                EmbeddedNats(work / name / "nats", log_file=work / f"{name}-nats.log"))
            edge_nats = ingest_nats = NatsSettings(url=plain.url)
        dsn = await pg.create_database(f"tls_cost_{name}_{tag}")
        # The topology is the cloud's: an ingest creates it, then stops, so the bridge's
        # shipping is timed alone and the ingest's drain after it.
        ingest_settings = IngestSettings(postgres_dsn=dsn, port=0)
        async with _serving(Ingest(ingest_settings, ingest_nats)):
            pass
        bridge = Bridge(BridgeSettings(
            edge_id=EDGE, port=0, buffer_dir=work / name / "buffer",
            buffer_max_bytes=2 * 1024**3, shipper=ShipperSettings(linger_ms=5),
        ), edge_nats)
        async with _serving(bridge):
            await _until(lambda: _true(bridge.nats_connected), "bridge connected")
            started = time.perf_counter()
            async with EdgeClient(bridge.url) as client:
                for i in range(records):
                    client.publish("telemetry", {"i": i, "temp_c": 20.5, "site": "tls-cost"})
                await client.flush()

            async def shipped() -> bool:
                return _counter(bridge, "edgesync_records_shipped_total") >= records

            await _until(shipped, "all records JetStream-acknowledged")
            edge_rate = records / (time.perf_counter() - started)
        started = time.perf_counter()
        async with _serving(Ingest(ingest_settings, ingest_nats)), connected(dsn) as conn:
            async def committed() -> bool:
                count = await conn.fetchval("SELECT count(*) FROM records")
                return int(count) >= records

            await _until(committed, "all records committed")
        ingest_rate = records / (time.perf_counter() - started)
    return edge_rate, ingest_rate


async def _true(value: bool) -> bool:
    return value


def _counter(bridge: Bridge, name: str) -> float:
    total = 0.0
    for metric in bridge.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == name:
                total += sample.value
    return total


OPEN, SECURED = "open (no TLS, no auth)", "secured (TLS + nkey auth)"


async def measure(records: int, rounds: int = 2) -> dict[str, tuple[float, float]]:
    """Both configurations in one run, alternating ``rounds`` times (so warm-up and
    the machine's load fall on both); the best of each."""
    best: dict[str, tuple[float, float]] = {OPEN: (0.0, 0.0), SECURED: (0.0, 0.0)}
    with tempfile.TemporaryDirectory(prefix="edgesync-tls-cost-") as tmp:
        work = Path(tmp)
        # As root, the PostgreSQL server user must reach its cluster below this.
        await asyncio.to_thread(work.chmod, 0o755)
        async with EmbeddedPostgres(work / "pg") as pg:
            for round_ in range(rounds):
                for name, secured in ((OPEN, False), (SECURED, True)):
                    edge, ingest = await _one(work / f"r{round_}", pg, secured=secured,
                                              records=records, tag=f"r{round_}")
                    best[name] = (max(best[name][0], edge), max(best[name][1], ingest))
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2,
                        help="Alternating runs of each configuration; the best counts.")
    args = parser.parse_args(argv)
    results = asyncio.run(measure(args.records, args.rounds))
    table = Table(title=f"NATS TLS + auth, on vs off ({args.records:,} records, best of "
                        f"{args.rounds} alternating rounds, same run)")
    for col in ("configuration", "edge path (rec/s, JetStream-acked)",
                "ingest drain (rec/s, committed)"):
        table.add_column(col)
    for name, (edge, ingest) in results.items():
        table.add_row(name, f"{edge:,.0f}", f"{ingest:,.0f}")
    (open_edge, open_ingest), (sec_edge, sec_ingest) = results[OPEN], results[SECURED]
    table.add_row("secured / open", f"{sec_edge / open_edge:.2f}x",
                  f"{sec_ingest / open_ingest:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
