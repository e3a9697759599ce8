"""Many simulated edges in the bench process, speaking the real protocol to the cloud.

A real fleet is thousands of bridges, each with its own NATS connection. Running
thousands of bridge processes on one machine would measure the machine, not the
cloud, so :class:`Fleet` plays every edge from one process and one connection, on
the wire exactly as a bridge does:

- **records**: batches encoded with :func:`broker.protocol.wire.encode_batch`, each
  edge and stream with its own random epoch and dense seqs, published to
  ``<p>.rec.<edge>.<stream>`` with ``Nats-Msg-Id`` from :func:`msg_id` and a reply
  subject, so nats-server sends a JetStream publish ack per batch;
- **heartbeats**: :class:`broker.protocol.events.Heartbeat` on ``<p>.evt.<edge>``
  every ``heartbeat_s`` (the bridge's default is 5 s), spread evenly;
- **watermarks**: one subscription per edge on its keys' update subject
  (``$KV.<bucket>.<edge>.>``), and, once a second, a read of the key of every
  stream with uncommitted records (the bridge's catch-up), as the JetStream
  ``STREAM.MSG.GET`` request ``kv.get`` makes;
- **control**: one durable pull consumer ``ctl-<edge>`` per edge (the bridge's
  configuration), polled as the bridge polls: a pull request for one command that
  expires after ``control_poll_s`` (the bridge's ``control.poll_s``) and is sent again.

Replies (publish acks, pull responses, KV reads) arrive on one wildcard inbox per
kind, so the driver's cost per message is one callback, not a task per edge.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Final

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bench.data import Pool
from broker.protocol.events import Heartbeat, StreamHealth, encode_event
from broker.protocol.topology import Topology
from broker.protocol.wire import WIRE_VERSION, Batch, encode_batch, msg_id

__all__ = [
    "STREAMS",
    "Fleet",
    "FleetBatch",
    "edge_names",
    "fanin_batches",
]

STREAMS: Final = ("telemetry", "status")
_INBOX: Final = "_INBOX.fleet"
_MAX_UNACKED: Final = 4_000
"""Batches published and not yet JetStream-acked; the shipper's max_in_flight is 8
per edge, this bounds the whole fleet (it waits rather than queue without end)."""


def edge_names(n: int) -> list[str]:
    return [f"fleet-{i:05d}" for i in range(n)]


def fanin_batches(pool: Pool, edges: int, records: int, per_batch: int,
                  streams: tuple[str, ...] = STREAMS) -> list[Batch]:
    """``records`` as ``edges`` x ``streams`` edges' small batches, round-robin over
    the edges as a fleet's linger-driven batches interleave in JetStream."""
    rng = random.Random(edges)
    keys = [(e, s, rng.getrandbits(62) + 1) for e in edge_names(edges) for s in streams]
    next_seq = [1] * len(keys)
    source = list(pool.records(records))
    out: list[Batch] = []
    i = k = 0
    while i < len(source):
        edge, stream, epoch = keys[k]
        chunk = source[i:i + per_batch]
        out.append(Batch(WIRE_VERSION, edge, stream, epoch, next_seq[k], chunk))
        next_seq[k] += len(chunk)
        i += len(chunk)
        k = (k + 1) % len(keys)
    return out


@dataclass(slots=True)
class FleetBatch:
    """A batch shipped by the fleet, and when its watermark reached the edge."""

    edge: str
    stream: str
    epoch: int
    last_seq: int
    published: float
    seen: float | None = None


@dataclass(slots=True)
class _Stream:
    epoch: int
    next_seq: int = 1
    committed: int = 0
    waiting: deque[FleetBatch] = field(default_factory=deque)


class Fleet:
    """``n`` simulated edges on one NATS connection (see the module docstring)."""

    def __init__(self, nc: NATS, js: JetStreamContext, topology: Topology, pool: Pool,
                 n: int, *, heartbeat_s: float = 5.0, control_poll_s: float = 30.0) -> None:
        self.nc, self.js, self.topology, self.pool = nc, js, topology, pool
        self.edges = edge_names(n)
        self.heartbeat_s = heartbeat_s
        self.control_poll_s = control_poll_s
        rng = random.Random(n)
        self.streams = {(e, s): _Stream(rng.getrandbits(62) + 1)
                        for e in self.edges for s in STREAMS}
        self.by_epoch = {(e, s, st.epoch): st for (e, s), st in self.streams.items()}
        self.shipped: list[FleetBatch] = []
        self.commands: dict[str, list[float]] = {}
        """edge -> times a command reached it (its pull request got a message)."""
        self.heartbeats = 0
        self.acks = 0
        self.unacked = 0
        self.kv_reads = 0
        self._acked = asyncio.Event()
        self._subs: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._polling = False
        self._beat_i = 0

    # -- control consumers ---------------------------------------------------------------

    def _control_config(self, edge: str) -> ConsumerConfig:
        """What the bridge creates (edge_bridge.commanding)."""
        return ConsumerConfig(
            durable_name=f"ctl-{edge}", ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, ack_wait=30.0, max_ack_pending=1,
            max_deliver=-1, filter_subject=self.topology.control_subject(edge),
        )

    async def create_control_consumers(self, concurrency: int = 32) -> float:
        """Every edge's durable control consumer; returns the seconds it took."""
        queue = list(self.edges)
        started = time.perf_counter()

        async def worker() -> None:
            while queue:
                edge = queue.pop()
                await self.js.add_consumer(self.topology.control_stream,
                                           self._control_config(edge))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started

    # -- starting and stopping -------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe as every edge does, and start heartbeats and control polls."""
        nc = self.nc
        self._subs.append(await nc.subscribe(f"{_INBOX}.ack.*", cb=self._on_ack))
        self._subs.append(await nc.subscribe(f"{_INBOX}.ctl.*", cb=self._on_control))
        self._subs.append(await nc.subscribe(f"{_INBOX}.kv.*", cb=self._on_kv_read))
        for edge in self.edges:  # one per edge, as each bridge subscribes its own keys
            self._subs.append(await nc.subscribe(
                self.topology.watermark_updates_subject(edge), cb=self._on_watermark))
        self._polling = True
        for edge in self.edges:
            await self._poll(edge)
        self._tasks.append(asyncio.create_task(self._heartbeat_forever(), name="fleet-beats"))
        self._tasks.append(asyncio.create_task(self._catch_up_forever(), name="fleet-catch-up"))

    async def stop(self) -> None:
        self._polling = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sub in self._subs:
            with contextlib.suppress(Exception):  # the connection may be closing
                await sub.unsubscribe()

    # -- heartbeats ----------------------------------------------------------------------

    def _heartbeat(self, edge: str) -> bytes:
        now = time.time()
        streams = {
            s: StreamHealth(epoch=st.epoch, next_seq=st.next_seq,
                            shipped_seq=st.next_seq - 1, committed_seq=st.committed,
                            records=st.next_seq - 1 - st.committed, bytes=0,
                            dropped_overflow=0, dropped_ttl=0)
            for s in STREAMS for st in (self.streams[(edge, s)],)
        }
        return encode_event(Heartbeat(
            edge=edge, version="fleet-sim", sent_at=now, buffer_records=0, buffer_bytes=0,
            buffer_max_bytes=1024**3, unshipped_records=0, oldest_unshipped_age_s=0.0,
            disk_bytes=0, dropped={}, streams=streams,
        ))

    async def heartbeat_all(self) -> None:
        """One heartbeat from every edge now (so that the cloud knows them all)."""
        for i, edge in enumerate(self.edges):
            await self.nc.publish(self.topology.events_subject(edge), self._heartbeat(edge))
            self.heartbeats += 1
            if i % 500 == 499:
                await asyncio.sleep(0)

    async def _heartbeat_forever(self) -> None:
        """Each edge every ``heartbeat_s``, phases spread evenly over the interval."""
        tick = 0.05
        n = len(self.edges)
        position = 0.0
        while True:
            await asyncio.sleep(tick)
            position += n * tick / self.heartbeat_s
            due, position = int(position), position - int(position)
            for _ in range(due):
                edge = self.edges[self._beat_i % n]
                self._beat_i += 1
                await self.nc.publish(self.topology.events_subject(edge), self._heartbeat(edge))
                self.heartbeats += 1

    # -- records -------------------------------------------------------------------------

    async def ship(self, edge: str, stream: str, count: int) -> None:
        """One batch of ``count`` records from ``edge``/``stream``, JetStream-acked later."""
        while self.unacked >= _MAX_UNACKED:
            self._acked.clear()
            await self._acked.wait()
        st = self.streams[(edge, stream)]
        first = st.next_seq
        size = len(self.pool.encoded)
        ts = time.time_ns() // 1000
        records = list(self.pool.records(count, start_seq=(first - 1) % size + 1, ts_us=ts))
        batch = Batch(WIRE_VERSION, edge, stream, st.epoch, first, records)
        body, headers = encode_batch(batch)
        headers["Nats-Msg-Id"] = msg_id(edge, stream, st.epoch, first, batch.last_seq)
        st.next_seq = batch.last_seq + 1
        shipped = FleetBatch(edge, stream, st.epoch, batch.last_seq, time.time())
        st.waiting.append(shipped)
        self.shipped.append(shipped)
        self.unacked += 1
        await self.nc.publish(self.topology.records_subject(edge, stream), body,
                              reply=f"{_INBOX}.ack.x", headers=headers)

    async def _on_ack(self, msg: Msg) -> None:
        self.acks += 1
        self.unacked -= 1
        self._acked.set()

    async def ship_paced(self, rate: float, seconds: float, per_batch: int) -> int:
        """Every edge-stream ships ``per_batch``-record batches, the fleet offering
        ``rate`` records/s in all, each edge-stream at its own phase (linger-driven
        batches of a fleet do not line up). Returns the records shipped."""
        pairs = list(self.streams)
        random.Random(len(pairs)).shuffle(pairs)
        batches_per_s = rate / per_batch
        started = time.monotonic()
        sent = 0
        i = 0
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= seconds:
                break
            due = int(elapsed * batches_per_s) + 1
            while sent < due:
                edge, stream = pairs[i % len(pairs)]
                i += 1
                await self.ship(edge, stream, per_batch)
                sent += 1
            await asyncio.sleep(0.005)
        return sent * per_batch

    # -- watermarks ----------------------------------------------------------------------

    def _apply(self, edge: str, stream: str, epoch: int, watermark: int) -> None:
        st = self.by_epoch.get((edge, stream, epoch))
        if st is None or watermark <= st.committed:
            return
        st.committed = watermark
        now = time.time()
        while st.waiting and st.waiting[0].last_seq <= watermark:
            st.waiting.popleft().seen = now

    async def _on_watermark(self, msg: Msg) -> None:
        key = self.topology.parse_watermark_subject(msg.subject)
        if key is not None and msg.data:
            self._apply(*key, int(msg.data))

    async def _catch_up_forever(self) -> None:
        """Once a second, every stream with uncommitted records reads its key."""
        api = f"$JS.API.STREAM.MSG.GET.KV_{self.topology.watermarks_bucket}"
        while True:
            await asyncio.sleep(1.0)
            k = 0
            for (edge, stream), st in self.streams.items():
                if st.next_seq - 1 <= st.committed:
                    continue
                subject = self.topology.watermark_subject(edge, stream, st.epoch)
                request = json.dumps({"last_by_subj": subject}).encode()
                await self.nc.publish(api, request, reply=f"{_INBOX}.kv.x")
                self.kv_reads += 1
                k += 1
                if k % 500 == 0:
                    await asyncio.sleep(0)

    async def _on_kv_read(self, msg: Msg) -> None:
        try:
            found = _kv_reply.decode(msg.data).message
        except msgspec.DecodeError:
            return
        if found is None or not found.data:
            return  # no such key yet
        key = self.topology.parse_watermark_subject(found.subject)
        if key is not None:
            self._apply(*key, int(base64.b64decode(found.data)))

    # -- control -------------------------------------------------------------------------

    async def _poll(self, edge: str) -> None:
        request = {"batch": 1, "expires": int(self.control_poll_s * 1e9) - 100_000}
        await self.nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self.topology.control_stream}.ctl-{edge}",
            json.dumps(request).encode(), reply=f"{_INBOX}.ctl.{edge}")

    async def _on_control(self, msg: Msg) -> None:
        edge = msg.subject.rsplit(".", 1)[1]
        status = (msg.headers or {}).get("Status")
        if status is None and msg.reply:
            self.commands.setdefault(edge, []).append(time.time())
            await self.nc.publish(msg.reply, b"+ACK")  # the bridge acks once it applied
        if self._polling and status != "100":
            await self._poll(edge)

    def watermark_latencies(self) -> list[FleetBatch]:
        return [b for b in self.shipped if b.seen is not None]

    def pending(self) -> int:
        return sum(len(st.waiting) for st in self.streams.values())


class _KvMessage(msgspec.Struct):
    subject: str
    data: str = ""


class _KvReply(msgspec.Struct):
    message: _KvMessage | None = None


_kv_reply: Final = msgspec.json.Decoder(_KvReply)
