"""Tells each edge how far the cloud has committed: the end-to-end acknowledgement.

After every commit the ingest knows the contiguous watermark of each
``(edge, stream, epoch)`` it touched: every seq up to it is committed in
PostgreSQL (or was dropped on purpose by the edge). The publisher coalesces
them, keeping only the highest per key, and writes them at most every
``interval_s`` into a JetStream key-value bucket under the key
``<edge>.<stream>.<epoch>``. A KV bucket is what makes an edge that was
offline learn the current value when it returns: it reads the key; an online
edge sees each update live on the bucket's subject.

Several ingest processes may write the same key; an edge only ever moves its
watermark forward, so a stale write is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from nats.js.kv import KeyValue

__all__ = ["WatermarkPublisher"]

log = structlog.get_logger(__name__)

_PUTS_IN_FLIGHT = 256
"""Watermark puts awaiting their JetStream ack at once (bounded like a shipper window)."""


class WatermarkPublisher:
    """Coalesces watermarks and publishes the latest of each key periodically."""

    def __init__(self, kv: KeyValue, *, interval_s: float = 0.25) -> None:
        self._kv = kv
        self._interval = interval_s
        self._pending: dict[tuple[str, str, int], int] = {}
        self._published: dict[tuple[str, str, int], int] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self.published = 0

    def note(self, watermarks: list[tuple[str, str, int, int]]) -> None:
        """Record watermarks seen after a commit; cheap, never blocks."""
        for edge, stream, epoch, watermark in watermarks:
            key = (edge, stream, epoch)
            if watermark > max(self._pending.get(key, 0), self._published.get(key, 0)):
                self._pending[key] = watermark
        if self._pending:
            self._wake.set()

    def begin_shutdown(self) -> None:
        self._stopping = True
        self._wake.set()

    async def publish_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()
            if self._stopping:
                return
            await asyncio.sleep(self._interval)  # the coalescing window

    async def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        items = list(pending.items())
        # A fleet touches thousands of keys per window: one put after another would be
        # one JetStream round trip each (4,000 keys x ~0.2 ms = most of a second), so
        # the puts of a window go out together, a bounded number in flight at a time.
        for i in range(0, len(items), _PUTS_IN_FLIGHT):
            chunk = items[i:i + _PUTS_IN_FLIGHT]
            results = await asyncio.gather(
                *(self._kv.put(f"{e}.{s}.{ep}", str(w).encode()) for (e, s, ep), w in chunk),
                return_exceptions=True,
            )
            for (key, watermark), result in zip(chunk, results, strict=True):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                if isinstance(result, BaseException):
                    # NATS unavailable: keep the value for the next round (if still newest).
                    log.warning("watermark_publish_failed", edge=key[0], stream=key[1],
                                error=f"{type(result).__name__}: {result}")
                    if watermark > self._pending.get(key, 0):
                        self._pending[key] = watermark
                    self._wake.set()
                    continue
                self._published[key] = watermark
                self.published += 1
        if len(self._published) > 100_000:
            # Bounded memory: forgetting only costs a redundant publish later.
            with contextlib.suppress(KeyError):
                for key in list(self._published)[:50_000]:
                    del self._published[key]
