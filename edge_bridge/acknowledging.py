"""The edge half of the end-to-end acknowledgement, and drop reporting.

:class:`WatermarkFollower` learns, per ``(stream, epoch)``, the cloud's committed
watermark (every seq up to it is committed in PostgreSQL or accounted for as
dropped) and lets the buffer delete those records. Updates arrive live on the
watermark bucket's subject; a periodic read of the bucket catches up after an
outage, so an edge that was offline learns the current values when it returns.

A watermark is a claim, not a proof: the bridge never trims above what it shipped
itself (or dropped by policy) for that ``(stream, epoch)``. A higher value, from a
bug or a forged KV write, would delete records the cloud never received; it is
ignored, logged (``watermark_ignored``) and counted
(``edgesync_watermarks_ignored_total``). ``above_shipped`` also happens legitimately
for a moment after a bridge restart, until the backlog is shipped again;
``beyond_assigned`` (a seq this bridge never gave out) never does. An
``above_shipped`` value is still passed to the shipper
(:meth:`~edge_bridge.shipping.Shipper.on_watermark_seen`): it trims nothing, but
the batches below it stop holding room in the shipper's ``max_unconfirmed_bytes``
window, which would otherwise wait for ever for a watermark it cannot apply.

Both work on one :class:`~edge_bridge.shipping.Shipper`'s buffer: a watermark
trims only what that shipper shipped.

:class:`DropReporter` tells the cloud about every run of records the buffer
dropped by policy, and repeats itself until the watermark passes the run, so a
marker lost on the way is sent again. A run the buffer extended (more records
dropped right after it) is sent again at once, with the same first seq and the
new last seq and count; the cloud keeps the longest marker per first seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from broker.errors import ClosedError
from broker.protocol.events import DropMarker, encode_event
from edge_bridge.metrics import BridgeMetrics
from edge_bridge.shipping import Shipper

__all__ = ["DropReporter", "WatermarkFollower"]

log = structlog.get_logger(__name__)


class WatermarkFollower:
    def __init__(
        self,
        *,
        nc: NATS,
        js: JetStreamContext,
        shipper: Shipper,
        metrics: BridgeMetrics | None = None,
        catch_up_interval_s: float = 1.0,
    ) -> None:
        self._nc = nc
        self._js = js
        self._shipper = shipper
        # What the shipper shipped is what a watermark may trim: the same buffer and edge.
        self._buffer = shipper.buffer
        self._edge = shipper.edge_id
        self._topology = shipper.topology
        self._interval = catch_up_interval_s
        self._kv: KeyValue | None = None
        self._lock = asyncio.Lock()
        self._metrics = metrics
        self._ignored: dict[tuple[str, int], int] = {}
        """The last refused value per ``(stream, epoch)``: logged and counted once."""

    async def follow_forever(self) -> None:
        sub = await self._nc.subscribe(
            self._topology.watermark_updates_subject(self._edge), cb=self._on_update
        )
        try:
            while True:
                await self._catch_up()
                await asyncio.sleep(self._interval)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_update(self, msg: Msg) -> None:
        key = self._topology.parse_watermark_subject(msg.subject)
        try:
            watermark = int(msg.data)
        except ValueError:
            key = None
        if key is None:
            log.warning("watermark_malformed", subject=msg.subject)
            return
        await self.apply(key[1], key[2], watermark)

    async def _catch_up(self) -> None:
        try:
            if self._kv is None:
                self._kv = await self._js.key_value(self._topology.watermarks_bucket)
            for stream in self._buffer.stream_names():
                state = self._buffer.stream_state(stream)
                if state is None or state.next_seq - 1 <= state.committed_seq:
                    continue
                try:
                    entry = await self._kv.get(
                        self._topology.watermark_key(self._edge, stream, state.epoch))
                except KeyNotFoundError:
                    continue
                if not entry.value:
                    continue
                try:
                    watermark = int(entry.value)
                except ValueError:
                    # Not the cloud's (another edge can have a JetStream ack written to
                    # any key: docs/security.md). Skipped alone: it used to end the round,
                    # and with it the catch-up of every stream after it.
                    if self._ignored.get((stream, state.epoch)) != -1:
                        self._ignored[(stream, state.epoch)] = -1
                        log.warning("watermark_malformed", stream=stream, epoch=state.epoch)
                    continue
                await self.apply(stream, state.epoch, watermark)
        except BucketNotFoundError:
            log.debug("watermark_bucket_missing")  # no ingest has started yet
        except ClosedError:
            raise
        except Exception as exc:  # NATS down: the next round tries again
            log.debug("watermark_catch_up_failed", error=f"{type(exc).__name__}: {exc}")

    async def apply(self, stream: str, epoch: int, watermark: int) -> None:
        """Trim what the cloud has committed; a stale or foreign value is ignored."""
        state = self._buffer.stream_state(stream)
        if state is None or state.epoch != epoch or watermark <= state.committed_seq:
            return
        if watermark > self._shipper.shipped_high(stream, epoch):
            bound = await self._disposed_upto(stream, epoch)
            if watermark > bound:
                self._refuse(stream, epoch, watermark, bound, assigned=state.next_seq - 1)
                if watermark < state.next_seq:  # above_shipped: ours, not yet shipped again
                    self._shipper.on_watermark_seen(stream, epoch, watermark)
                return
        async with self._lock:
            deleted = await self._buffer.trim(stream, epoch, watermark)
        self._shipper.on_committed(stream, epoch, watermark)
        log.debug("records_committed_upstream", stream=stream, epoch=epoch,
                  watermark=watermark, deleted=deleted)


    async def _disposed_upto(self, stream: str, epoch: int) -> int:
        """Highest seq up to which every record was shipped or dropped by this bridge:
        the shipped high mark, extended over the drop runs that continue it (records
        dropped before they could be shipped need no shipping to be accounted)."""
        bound = self._shipper.shipped_high(stream, epoch)
        for name, drop_epoch, first, last, *_ in await self._buffer.pending_drops():
            if name == stream and drop_epoch == epoch and first <= bound + 1:
                bound = max(bound, last)
        return bound

    def _refuse(self, stream: str, epoch: int, watermark: int, bound: int, *,
                assigned: int) -> None:
        if self._ignored.get((stream, epoch)) == watermark:
            return  # the catch-up loop reads the same value every round
        self._ignored[(stream, epoch)] = watermark
        reason = "beyond_assigned" if watermark > assigned else "above_shipped"
        if self._metrics is not None:
            self._metrics.watermarks_ignored.labels(stream, reason).inc()
        (log.warning if reason == "beyond_assigned" else log.info)(
            "watermark_ignored", stream=stream, epoch=epoch, watermark=watermark,
            shipped_upto=bound, highest_assigned=assigned, reason=reason,
        )


class DropReporter:
    def __init__(
        self,
        *,
        js: JetStreamContext,
        shipper: Shipper,
        repeat_after_s: float,
        interval_s: float = 1.0,
    ) -> None:
        self._js = js
        self._shipper = shipper
        self._repeat_after = repeat_after_s
        self._interval = interval_s
        self._sent: dict[tuple[str, int, int, int], float] = {}

    async def report_forever(self) -> None:
        while True:
            try:
                await self.report_once()
            except ClosedError:
                return
            except Exception as exc:
                log.debug("drop_report_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self._interval)

    async def report_once(self) -> int:
        """Publish the markers not sent recently; returns how many were sent."""
        now = time.monotonic()
        pending = await self._shipper.buffer.pending_drops()
        live = set()
        sent = 0
        for stream, epoch, first, last, count, reason, dropped_at in pending:
            # A run the buffer extended since it was last sent is news: sent at once.
            key = (stream, epoch, first, last)
            live.add(key)
            if now - self._sent.get(key, -1e18) < self._repeat_after:
                continue
            edge = self._shipper.edge_id
            marker = DropMarker(edge=edge, stream=stream, epoch=epoch, first_seq=first,
                                last_seq=last, count=count, reason=reason,
                                dropped_at=dropped_at)
            await self._js.publish(
                self._shipper.topology.events_subject(edge), encode_event(marker),
                # Salted as the batches' ids are (broker.protocol.wire.msg_id): ES_EVENTS'
                # duplicate window is the stream's, and another edge publishing this id
                # first on its own subject would have the marker dropped, its stream
                # left below the gap.
                headers={"Nats-Msg-Id": f"drop.{edge}.{stream}.{epoch}.{first}-{last}"
                                        f".{self._shipper.salt}"},
            )
            self._sent[key] = now
            sent += 1
            log.info("drop_marker_sent", stream=stream, epoch=epoch, first_seq=first,
                     last_seq=last, count=count, reason=reason)
        for key in set(self._sent) - live:
            del self._sent[key]
        return sent
