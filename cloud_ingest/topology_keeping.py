"""Keeps the JetStream topology the ingest owns in place while it runs.

The ingest creates the streams, the KV buckets and its durable consumers at start
(:meth:`broker.protocol.topology.Topology.ensure_all`). JetStream can lose them
afterwards: a store wiped or replaced by an older copy, a stream or consumer deleted
by hand. Until they exist again every pull request is answered ``503`` (no
responders), every watermark write too, and every bridge's publish fails with "no
response from stream": the pipeline stalls for good, with the ingest reporting ready.

So whenever a worker's fetch or a watermark write fails, the worker calls
:meth:`TopologyKeeper.suspect`; the keeper then checks (stream and consumer info,
reads only) and, if anything is missing, makes it again: the owner's step, then the
ingest's consumers. Checks run at most once per ``min_interval_s`` however many
workers fail at once. Meanwhile ``ok`` is False (readiness turns false), and each
repair is logged (``topology_recreated``, naming what was missing) and counted
(``edgesync_ingest_topology_repairs_total``). What JetStream lost is then repaired end
to end as any loss between a bridge and PostgreSQL is: the edges retransmit what the
committed watermark has not passed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

import structlog
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from broker.interrupting import Interrupted, unless
from broker.protocol.topology import Topology
from cloud_ingest.metrics import IngestMetrics

__all__ = ["TopologyKeeper"]

log = structlog.get_logger(__name__)


class TopologyKeeper:
    """Checks the topology when told something failed; recreates what is missing.

    Args:
        consumers: ``(stream, durable, ensure)`` of each durable consumer the ingest
            pulls from; ``ensure`` creates it (idempotently).
        min_interval_s: the least time between two checks.
    """

    def __init__(self, js: JetStreamContext, topology: Topology, *,
                 consumers: Sequence[tuple[str, str, Callable[[], Awaitable[None]]]],
                 metrics: IngestMetrics, min_interval_s: float = 1.0) -> None:
        self._js = js
        self._topology = topology
        self._consumers = list(consumers)
        self._metrics = metrics
        self._min_interval = min_interval_s
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self.ok = True
        """False from a check that found something missing until it is made again."""
        self.repairs = 0

    def suspect(self) -> None:
        """Something failed that a missing stream or consumer would explain; cheap."""
        self._wake.set()

    def begin_shutdown(self) -> None:
        """End :meth:`keep_forever` at once (a check in progress is cancelled)."""
        self._stop.set()
        self._wake.set()

    async def keep_forever(self) -> None:
        """Check whenever :meth:`suspect` was called, until :meth:`begin_shutdown`."""
        while not self._stop.is_set():
            await self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if not await self._check_unless_stopping():
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS down, or a repair refused: checked again
                log.info("topology_check_failed", error=f"{type(exc).__name__}: {exc}")
            if not self.ok:  # a repair failed half-way: nothing else may ask again
                self._wake.set()
            with contextlib.suppress(TimeoutError):  # the least time between two checks
                await asyncio.wait_for(self._stop.wait(), self._min_interval)

    async def _check_unless_stopping(self) -> bool:
        """:meth:`check`, cancelled if the shutdown begins meanwhile (a JetStream request
        may wait seconds while NATS is away); False then."""
        try:
            await unless(self.check(), self._stop)
        except Interrupted:
            return False
        return True

    async def missing(self) -> list[str]:
        """What of the ingest's topology JetStream does not hold (reads only)."""
        t = self._topology
        names = [s.name or "" for s in t.stream_configs()]
        names += [f"KV_{t.watermarks_bucket}", f"KV_{t.desired_bucket}"]
        missing = await t.missing_streams(self._js, names)
        for stream, durable, _ in self._consumers:
            if stream in missing:
                missing.append(f"{stream}/{durable}")
                continue
            try:
                await self._js.consumer_info(stream, durable)
            except NotFoundError:
                missing.append(f"{stream}/{durable}")
        return missing

    async def check(self) -> list[str]:
        """Recreate whatever is missing; returns what was."""
        missing = await self.missing()
        if not missing:
            self.ok = True
            return missing
        self.ok = False
        log.warning("topology_missing", missing=missing)
        failed: list[Exception] = []
        try:
            await self._topology.ensure_all(self._js)
        except Exception as exc:  # one stream refused: still make the consumers that can be
            failed.append(exc)
        for _, _, ensure in self._consumers:
            try:
                await ensure()
            except Exception as exc:
                failed.append(exc)
        if failed:
            raise failed[0]
        self.ok = True
        self.repairs += 1
        self._metrics.topology_repairs.inc()
        log.warning("topology_recreated", recreated=missing,
                    hint="JetStream lost state (store wiped or restored?): the edges "
                         "retransmit what was not committed")
        return missing
