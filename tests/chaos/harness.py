"""The whole system as separate OS processes, under load, for fault injection.

:class:`ChaosSystem` runs PostgreSQL (its own cluster, ``synchronous_commit``
on, so an acknowledged commit survives a kill), one nats-server, two ingest
processes on one durable consumer and two edge bridges, each one
``python -m broker ...`` child (:class:`~broker.runtime.children.ServiceProcess`)
configured by ``EDGESYNC_*`` variables built from settings objects, on the port
it bound. Every process is started, signalled and stopped by pid.

:class:`Load` drives the bridges with SDK producers
(:class:`edge_bridge.sdk.EdgeClient`) and writes down every acknowledged
record: its identity ``(edge, stream, epoch, seq)`` from the ``RecordAck`` and
the unique ``uid`` its payload carries.

A scenario runs the load, injects its faults (sleeps between faults *are* the
schedule), stops the load, waits for quiescence with a deadline, and
:meth:`ChaosSystem.reconcile` proves the contract against ``records``: every
acknowledged identity there exactly once (duplicates are counted by payload
``uid``, since the primary key forbids duplicate identities), anything missing
covered by a drop marker. The resulting :class:`Outcome` is printed and
appended to the results file that ``python -m tests.chaos.report`` renders
into ``docs/reliability.md``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from broker.pg_connecting import connected
from broker.runtime.children import ServiceProcess, settings_env
from broker.runtime.embedded_nats import EmbeddedNats
from broker.runtime.embedded_postgres import EmbeddedPostgres
from broker.settings import (
    BridgeSettings,
    IngestSettings,
    LogSettings,
    NatsSettings,
    ShipperSettings,
)
from edge_bridge.sdk import EdgeClient, RecordAck
from tests.support import until

__all__ = [
    "RESULTS_FILE",
    "ChaosSystem",
    "Identity",
    "Load",
    "Outcome",
    "chaos_system",
    "duplicated_rows",
]

RESULTS_FILE = Path(
    os.environ.get(
        "EDGESYNC_CHAOS_RESULTS",
        Path(__file__).resolve().parents[2] / ".edgesync" / "chaos-results.json",
    )
)
"""Where each scenario appends its row (git-ignored, so test runs leave the tree
clean); ``python -m tests.chaos.report`` renders it into docs/reliability.md."""

_UIDS = itertools.count()
"""Payload uids, unique across every Load of a test process."""

Identity = tuple[str, str, int, int]
"""``(edge, stream, epoch, seq)``: a record's identity as the SDK was told it."""


@dataclass
class Outcome:
    """One row of the reliability table."""

    scenario: str
    acknowledged: int
    committed: int
    lost: int
    duplicated: int
    dropped_by_policy: int
    recover_s: float
    notes: str = ""
    at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def save(self) -> None:
        RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, Any]] = []
        if RESULTS_FILE.exists():
            rows = json.loads(RESULTS_FILE.read_text() or "[]")
        rows.append(asdict(self))
        RESULTS_FILE.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"\nCHAOS {self.scenario}: acknowledged={self.acknowledged} "
              f"committed={self.committed} lost={self.lost} duplicated={self.duplicated} "
              f"dropped_by_policy={self.dropped_by_policy} recover_s={self.recover_s:.1f}")


class Load:
    """SDK producers, one per bridge, publishing a steady flow of unique records."""

    def __init__(self, system: ChaosSystem, *, streams: tuple[str, ...] = ("s1", "s2"),
                 rate: float = 2000.0, retry_timeout_s: float = 120.0,
                 edges: list[str] | None = None, ordered: bool = False) -> None:
        """``ordered``: one request in flight per producer, so that seq follows publish
        order across batches too (EdgeClient's docstring); the default sends several."""
        self.system = system
        self.ordered = ordered
        self.streams = streams
        self.rate = rate  # records per second per producer
        self.retry_timeout_s = retry_timeout_s
        self.edges = edges if edges is not None else list(system.bridges)
        self.acked: dict[Identity, str] = {}
        """Acknowledged identity -> payload uid."""
        self.failed = 0
        self.published = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        for edge in self.edges:
            self._tasks.append(asyncio.create_task(self._produce(edge), name=f"load-{edge}"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop publishing and wait until every published record is acked or failed."""
        self._stop.set()
        if self._tasks:
            await asyncio.wait_for(asyncio.gather(*self._tasks), self.retry_timeout_s + 60)
            self._tasks = []

    async def wait_acked(self, n: int, timeout: float = 30.0) -> None:
        await until(lambda: len(self.acked) >= n, timeout=timeout, interval=0.05,
                    message=f"fewer than {n} records acknowledged")

    async def _produce(self, edge: str) -> None:
        bridge = self.system.bridges[edge]
        futures: set[asyncio.Future[RecordAck]] = set()
        async with EdgeClient(bridge.url, linger_ms=5, retry_timeout_s=self.retry_timeout_s,
                              max_pending_records=20_000,
                              **({"max_in_flight": 1} if self.ordered else {})) as client:
            interval = 0.01
            per_tick = max(1, int(self.rate * interval))
            stream_cycle = itertools.cycle(self.streams)
            while not self._stop.is_set():
                for _ in range(per_tick):
                    uid = f"{edge}:{next(_UIDS)}"
                    try:
                        fut = client.publish(next(stream_cycle), {"uid": uid, "pad": "x" * 64},
                                             ts=self.system.clock(edge))
                    except Exception:  # BufferFull at the client: back off, this is load
                        break
                    self.published += 1
                    fut.add_done_callback(self._on_done(edge, uid, futures))
                    futures.add(fut)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), interval)
            await client.flush()
            if futures:
                await asyncio.wait(futures)

    def _on_done(self, edge: str, uid: str, futures: set[asyncio.Future[RecordAck]]) -> Any:
        def done(fut: asyncio.Future[RecordAck]) -> None:
            futures.discard(fut)
            if fut.cancelled() or fut.exception() is not None:
                self.failed += 1
                return
            ack = fut.result()
            self.acked[(edge, ack.stream, ack.epoch, ack.seq)] = uid

        return done


def _bridge_env(edge: str, buffer_dir: Path, nats_url: str) -> dict[str, str]:
    settings = BridgeSettings(
        edge_id=edge,
        buffer_dir=buffer_dir,
        heartbeat_interval_s=0.5,
        shipper=ShipperSettings(
            linger_ms=5,
            # Short, so a loss between JetStream and Postgres is repaired within a test.
            retransmit_timeout_s=5,
            retransmit_backoff_max_s=10,
            retry_backoff_max_s=1,
        ),
    )
    nats = NatsSettings(url=nats_url, publish_timeout_s=2)
    return settings_env(bridge=settings, nats=nats, log=LogSettings(level="info"))


class ChaosSystem:
    """Postgres, nats-server, two ingests and the bridges, all separate processes."""

    def __init__(self, tmp: Path, *, edges: tuple[str, ...] = ("edge-a", "edge-b"),
                 bridge_env: Mapping[str, Mapping[str, str]] | None = None,
                 pg_dir: Path | None = None) -> None:
        """``pg_dir``: PostgreSQL's data directory (default ``tmp/pg``), e.g. on a
        filesystem the test fills."""
        self.tmp = tmp
        self.pg = EmbeddedPostgres(pg_dir or tmp / "pg", synchronous_commit=True)
        self.nats = EmbeddedNats(tmp / "nats-store", log_file=tmp / "nats.log")
        self.dsn = ""
        self.edges = edges
        self._bridge_env = bridge_env or {}
        self.bridges: dict[str, ServiceProcess] = {}
        self.ingests: list[ServiceProcess] = []
        self.skew_s: dict[str, float] = {}
        """Seconds added to an edge's producer timestamps (clock skew)."""

    def clock(self, edge: str) -> float:
        return time.time() + self.skew_s.get(edge, 0.0)

    async def start(self) -> None:
        await self.pg.start()
        self.dsn = await self.pg.create_database("chaos")
        await self.nats.start()
        # Redelivery after a killed ingest comes after ack_wait_s.
        ingest = IngestSettings(postgres_dsn=self.dsn, db_retry_max_s=0.5, ack_wait_s=5)
        env = settings_env(ingest=ingest, nats=NatsSettings(url=self.nats.url),
                           log=LogSettings(level="info"))
        for i in range(2):
            self.ingests.append(ServiceProcess(
                "ingest", env, log_file=self.tmp / f"ingest-{i}.log", name=f"ingest-{i}"
            ))
        # One after the other: the first creates the schema, streams and consumer.
        for ingest in self.ingests:
            await ingest.start()
        for edge in self.edges:
            env = {**_bridge_env(edge, self.tmp / f"buffer-{edge}", self.nats.url),
                   **self._bridge_env.get(edge, {})}
            self.bridges[edge] = ServiceProcess(
                "bridge", env, log_file=self.tmp / f"bridge-{edge}.log", name=f"bridge-{edge}"
            )
        await asyncio.gather(*(b.start() for b in self.bridges.values()))

    async def close(self) -> None:
        for proc in [*self.bridges.values(), *self.ingests]:
            with contextlib.suppress(Exception):
                await proc.stop()
        await self.nats.stop()
        await self.pg.close()

    # -- reconciliation -------------------------------------------------------------------

    async def _fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        async with connected(self.dsn, timeout=5) as conn:
            return list(await conn.fetch(query, *args))

    async def committed_identities(self) -> dict[Identity, list[str]]:
        rows = await self._fetch(
            "SELECT edge_id, stream, epoch, seq, payload->>'uid' AS uid FROM v_records"
        )
        found: dict[Identity, list[str]] = {}
        for r in rows:
            found.setdefault((r["edge_id"], r["stream"], r["epoch"], r["seq"]), []).append(r["uid"])
        return found

    async def dropped_ranges(self) -> list[tuple[str, str, int, int, int]]:
        rows = await self._fetch(
            "SELECT edge_id, stream, epoch, first_seq, last_seq FROM drop_markers"
        )
        return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def quiesce(self, load: Load, *, timeout: float = 120.0) -> float:
        """Wait until every acknowledged record is committed or explained by a drop
        marker; returns the seconds it took."""
        started = time.monotonic()

        async def settled() -> bool:
            committed = await self.committed_identities()
            drops = await self.dropped_ranges()
            return all(
                ident in committed or _explained(ident, drops) for ident in load.acked
            )

        await until(settled, timeout=timeout, interval=0.5,
                    message="acknowledged records still missing from PostgreSQL")
        return time.monotonic() - started

    async def reconcile(self, scenario: str, load: Load, *, recover_s: float,
                        notes: str = "") -> Outcome:
        committed = await self.committed_identities()
        drops = await self.dropped_ranges()
        lost = dropped = 0
        for ident, uid in load.acked.items():
            if ident in committed:
                assert committed[ident] == [uid], (ident, committed[ident], uid)
            elif _explained(ident, drops):
                dropped += 1
            else:
                lost += 1
        outcome = Outcome(
            scenario=scenario,
            acknowledged=len(load.acked),
            committed=sum(1 for i in load.acked if i in committed),
            lost=lost,
            duplicated=duplicated_rows(committed),
            dropped_by_policy=dropped,
            recover_s=round(recover_s, 1),
            notes=notes,
        )
        outcome.save()
        return outcome


def duplicated_rows(committed: Mapping[Identity, list[str]]) -> int:
    """Rows beyond the first of each payload uid: what was committed more than once."""
    rows = collections.Counter(uid for uids in committed.values() for uid in uids)
    return sum(n - 1 for n in rows.values() if n > 1)


def _explained(ident: Identity, drops: list[tuple[str, str, int, int, int]]) -> bool:
    edge, stream, epoch, seq = ident
    return any(
        d[0] == edge and d[1] == stream and d[2] == epoch and d[3] <= seq <= d[4] for d in drops
    )


@contextlib.asynccontextmanager
async def chaos_system(tmp: Path, **kwargs: Any) -> AsyncIterator[ChaosSystem]:
    system = ChaosSystem(tmp, **kwargs)
    try:
        await system.start()
        yield system
    finally:
        await system.close()
