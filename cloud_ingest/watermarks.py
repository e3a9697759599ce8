"""Tells each edge how far the cloud has committed: the end-to-end acknowledgement.

After every commit the ingest knows the contiguous watermark of each
``(edge, stream, epoch)`` it touched: every seq up to it is committed in
PostgreSQL (or was dropped on purpose by the edge). The publisher coalesces
them, keeping only the highest per key, and writes them at most every
``interval_s`` into a JetStream key-value bucket under the key
``<edge>.<stream>.<epoch>``. A KV bucket is what makes an edge that was
offline learn the current value when it returns: it reads the key; an online
edge sees each update live on the bucket's subject.

A fleet touches thousands of keys per window, so a window's writes are KV puts
done by hand: each a publish to ``$KV.<bucket>.<key>``, handed to the client as one
write (:mod:`cloud_ingest.bulk_publishing`). (nats-py's ``kv.put`` is a request each:
a task, a timer, an inbox future and a parsed ``PubAck`` per key, which was a fifth
of the ingest's CPU under fan-in.)

Only the last put of each run of up to ``_RUN_PUTS`` asks for JetStream's ack, and
that ack vouches for the whole run: one connection's publishes to one stream are
handled in the order they were sent, and what would refuse one put of a run refuses
its last one too (no bucket, no stream leader, JetStream out of storage; values are
a few bytes, with no limit of their own). The exception is a connection lost in the
middle of a run (its first puts in the dead socket, the rest sent after the
reconnect): an ack read after a reconnect vouches for nothing, and the run is
written again. A fleet's window thus costs nats-server one ack per thousand puts,
not one per put (about a third of a put's cost there), and the ingest as few
replies to read. On the ingest's
:class:`~cloud_ingest.direct_delivery.DeliveringClient` the acks are handed over as
they are read (no ``Msg``, queue or task switch per ack). A run that is refused or
not acked in time is kept for the next window, except the writes whose key got a
newer value meanwhile.

A watermark is advice, never what makes a record safe (PostgreSQL is): should a
put be lost all the same (a clustered stream's leader changing in the middle of a
run), the key's next commit writes it again, and an edge whose stream went quiet
retransmits what stays unconfirmed (``shipper.retransmit_timeout_s``), which the
ingest answers by writing the key's watermark again (``GroupResult.repeated``).

Several ingest processes may write the same key; an edge only ever moves its
watermark forward, so a stale write is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from broker.protocol.tokens import is_valid_token
from broker.protocol.topology import Topology
from broker.protocol.wire import MAX_EPOCH
from cloud_ingest.bulk_publishing import publish_many
from cloud_ingest.direct_delivery import DeliveringClient, status_of, unsubscribe
from cloud_ingest.metrics import IngestMetrics

__all__ = ["WatermarkPublisher"]

log = structlog.get_logger(__name__)

_Key = tuple[str, str, int]

_RUN_PUTS = 1_024
"""Watermark puts in one run, whose last put alone is acked (module docstring); a
window's runs are written one after another."""
_ACK_TIMEOUT_S = 5.0
"""How long a run may wait for its ack before its writes count as failed."""
_PUBLISHED_MEMORY = 100_000
"""Keys whose last published value is remembered (to skip re-publishing it)."""


def _writable(key: _Key) -> bool:
    """Whether ``key`` can name a watermark's subject: its edge and stream tokens, its
    epoch as the wire allows it."""
    edge, stream, epoch = key
    return is_valid_token(edge) and is_valid_token(stream) and 0 < epoch <= MAX_EPOCH


def _refusal(data: bytes, status: str | None, *, reconnected: bool) -> str | None:
    """Why the reply to a run's acked put does not vouch for the run (None: it does).

    A JetStream ack is ``{"stream":…,"seq":…}``; a refusal ``{"error":{…}}``; no
    stream at all is an empty 503 status message (no responders). An ack read after
    the client reconnected vouches for nothing: the run's first puts may have been
    lost with the old connection."""
    if reconnected:
        return "reconnected while the run was written"
    if data and b'"error"' not in data:
        return None
    return data.decode(errors="replace") or status or "no reply"


class WatermarkPublisher:
    """Coalesces watermarks and publishes the latest of each key periodically."""

    def __init__(self, nc: NATS, topology: Topology, *, interval_s: float = 0.25,
                 metrics: IngestMetrics | None = None) -> None:
        """``metrics``, if given, count the writes and failures and show what waits."""
        self._nc = nc
        self._metrics = metrics
        self._subject_of = topology.watermark_subject
        self._interval = interval_s
        self._pending: dict[_Key, int] = {}
        self._published: dict[_Key, int] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._replies: Subscription | None = None
        self._reply_prefix = ""
        self._tokens = itertools.count()
        self._in_flight: dict[str, tuple[list[tuple[_Key, int]], int]] = {}
        """The acked put of each run in flight: the run's writes, and the client's
        reconnect count when they were handed to it."""
        self._acked = asyncio.Event()
        self._publishing = False
        self._refused: list[tuple[_Key, int, str]] = []
        self.published = 0
        """Writes JetStream acknowledged."""
        self.failures = 0
        """Writes refused or unanswered (each kept for the next window)."""
        self.refused_keys = 0
        """Keys never written because they cannot name a subject (:func:`_writable`)."""
        self.on_failed: Callable[[], None] | None = None
        """Called after a window with failed writes: the bucket may be gone
        (:mod:`cloud_ingest.topology_keeping`)."""

    def note(self, watermarks: list[tuple[str, str, int, int]], *, again: bool = False
             ) -> None:
        """Record watermarks seen after a commit; cheap, never blocks. ``again``: write
        them even if this publisher wrote them before (those of keys a group only
        repeated, ``GroupResult.repeated``, whose edge may not have seen them)."""
        for edge, stream, epoch, watermark in watermarks:
            key = (edge, stream, epoch)
            written = 0 if again else self._published.get(key, 0)
            if watermark > max(self._pending.get(key, 0), written):
                self._pending[key] = watermark
        if self._pending:
            self._wake.set()
        if self._metrics is not None:
            self._metrics.watermark_keys_pending.set(len(self._pending))

    def begin_shutdown(self) -> None:
        self._stopping = True
        self._wake.set()

    async def publish_forever(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                await self._flush()
                if self._stopping:
                    return
                await asyncio.sleep(self._interval)  # the coalescing window
        finally:
            if self._replies is not None:
                await unsubscribe(self._nc, self._replies)
                self._replies = None

    async def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        items = list(pending.items())
        published, failures = self.published, self.failures
        for i in range(0, len(items), _RUN_PUTS):
            await self._put_run(items[i:i + _RUN_PUTS])
        if (metrics := self._metrics) is not None:  # once per window, not per write
            metrics.watermark_writes.inc(self.published - published)
            metrics.watermark_write_failures.inc(self.failures - failures)
            metrics.watermark_keys_pending.set(len(self._pending))
        if len(self._published) > _PUBLISHED_MEMORY:
            # Bounded memory: forgetting only costs a redundant publish later.
            for key in list(self._published)[:_PUBLISHED_MEMORY // 2]:
                del self._published[key]

    async def _put_run(self, run: list[tuple[_Key, int]]) -> None:
        """Publish ``run``'s writes and wait for the ack of its last (or the timeout)."""
        failed: list[tuple[_Key, int, str]] = []
        try:
            prefix = await self._reply_subscription()
            self._acked.clear()
            self._publishing = True
            writes: list[tuple[_Key, int]] = []
            puts: list[tuple[str, str, bytes]] = []
            for key, watermark in run:
                if not _writable(key):
                    # Never written: one key that cannot be a subject (whitespace, a name
                    # longer than a NATS control line) would fail its whole run of writes,
                    # every window, every edge's. The event decoder refuses such names
                    # (broker.protocol.events); this is the last guard.
                    log.error("watermark_key_refused", edge=key[0][:80], stream=key[1][:80],
                              epoch=key[2])
                    self.refused_keys += 1
                    continue
                writes.append((key, watermark))
                puts.append((self._subject_of(*key), "", str(watermark).encode()))
            if puts:  # the last put asks for the ack that vouches for the run
                token = f"{prefix}{next(self._tokens)}"
                subject, _, payload = puts[-1]
                puts[-1] = (subject, token, payload)
                self._in_flight[token] = (writes, self._reconnects())
            await publish_many(self._nc, puts)  # the run's puts as one write
            self._publishing = False
            if not self._in_flight:
                self._acked.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), _ACK_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # NATS unavailable: what was not acked is kept (below)
            failed.extend((key, w, f"{type(exc).__name__}: {exc}")
                          for writes, _ in self._in_flight.values() for key, w in writes)
            self._in_flight.clear()
        self._publishing = False
        failed.extend((key, w, "no ack in time")
                      for writes, _ in self._in_flight.values() for key, w in writes)
        self._in_flight.clear()
        failed.extend(self._refused)
        self._refused.clear()
        if failed:
            self.failures += len(failed)
            key, _, error = failed[0]
            log.warning("watermark_publish_failed", writes=len(failed), edge=key[0],
                        stream=key[1], error=error)
            for key, watermark, _ in failed:
                if watermark > max(self._pending.get(key, 0), self._published.get(key, 0)):
                    self._pending[key] = watermark
            self._wake.set()
            if self.on_failed is not None:
                self.on_failed()

    async def _reply_subscription(self) -> str:
        if self._replies is None:
            inbox = self._nc.new_inbox()
            self._replies = await self._nc.subscribe(f"{inbox}.*", cb=self._on_ack)
            self._reply_prefix = f"{inbox}."
            if isinstance(self._nc, DeliveringClient):
                self._nc.deliver_directly(self._replies, self._take_ack)
        return self._reply_prefix

    def _reconnects(self) -> int:
        return int(self._nc.stats["reconnects"])

    async def _on_ack(self, msg: Msg) -> None:
        self._answered(msg.subject, msg.data, (msg.headers or {}).get("Status"))

    def _take_ack(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                  headers: bytes | None) -> bool:
        """The direct path's sink (:mod:`cloud_ingest.direct_delivery`): as :meth:`_on_ack`."""
        self._answered(subject.decode(), data, status_of(headers))
        return True

    def _answered(self, subject: str, data: bytes, status: str | None) -> None:
        run = self._in_flight.pop(subject, None)
        if run is None:
            return  # late: its run already counted as failed
        writes, reconnects = run
        refusal = _refusal(data, status, reconnected=reconnects != self._reconnects())
        if refusal is None:
            published = self._published
            for key, watermark in writes:
                if watermark > published.get(key, 0):
                    published[key] = watermark
            self.published += len(writes)
        else:
            self._refused.extend((key, watermark, refusal) for key, watermark in writes)
        if not self._in_flight and not self._publishing:
            self._acked.set()
