"""The records consumer's deliveries handed straight from nats-py's read loop, against a
real nats-server: they skip nats-py's per-message path yet carry what nats-py's
``Msg`` would (headers, metadata, acks), statuses end pull requests as before, an
unusual header block and every other subscription still take nats-py's path, the
registration survives a reconnect, and the ingest connects with this client.

These tests are also the fail-safe of the hook on nats-py's private names
(``Client._process_msg``, ``_subs``, ``stats``, a subscription's ``_id``,
``_received``, ``_max_msgs``, ``_jsi``): if nats-py changes them, deliveries stop
going direct or come wrong, and the assertions below fail."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.protocol.parser import AWAITING_CONTROL_LINE, Parser

from broker.protocol.topology import Topology
from broker.protocol.wire import (
    CT_JSON,
    ENCODING_HEADER,
    Batch,
    Record,
    decode_records,
    encode_batch,
    msg_id,
)
from broker.runtime.embedded_nats import EmbeddedNats
from cloud_ingest.bulk_publishing import ack_all
from cloud_ingest.direct_delivery import DeliveringClient, Delivery
from cloud_ingest.pulling import Puller, PullFailed
from tests.integration.harness import running_ingest, wait_for_records
from tests.support import until

STREAM, CONSUMER = "DIRECT", "ingest"
FRAME_PARSER = type(DeliveringClient()._ps)
"""The ingest client's parser (cloud_ingest.direct_delivery._FrameParser)."""


class WatchedPuller(Puller):
    """A Puller that records what reached it through nats-py's path (its callback)."""

    def __init__(self, nc: NATS, stream: str = STREAM, consumer: str = CONSUMER) -> None:
        super().__init__(nc, stream, consumer)
        self.through_nats_py: list[Msg] = []

    async def _delivered(self, msg: Msg) -> None:
        self.through_nats_py.append(msg)
        await super()._delivered(msg)


async def delivering_client(url: str, **options: object) -> DeliveringClient:
    nc = DeliveringClient()
    await nc.connect(url, **options)  # type: ignore[arg-type]
    return nc


async def add_stream(js: JetStreamContext, consumer: str = CONSUMER) -> None:
    await js.add_stream(name=STREAM, subjects=["d.>"])
    await js.add_consumer(STREAM, ConsumerConfig(durable_name=consumer,
                                                 ack_policy=AckPolicy.EXPLICIT, ack_wait=30))


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[DeliveringClient]:
    conn = await delivering_client(nats_server.url)
    await add_stream(conn.jetstream())
    yield conn
    await conn.close()


async def publish(js: JetStreamContext, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        await js.publish(f"d.e{i % 7}.s", str(i).encode(),
                         headers={"Nats-Msg-Id": f"e{i % 7}.s.1.{i * 10 + 1}-{i * 10 + 10}"})


async def ack_pending(js: JetStreamContext, consumer: str = CONSUMER) -> int:
    return (await js.consumer_info(STREAM, consumer)).num_ack_pending


async def test_deliveries_skip_nats_pys_path_and_carry_what_its_msg_would(
        nc: DeliveringClient, nats_server: EmbeddedNats) -> None:
    """Each delivery is a Delivery handed over directly (none through the callback),
    with the subject, reply, data, headers and metadata nats-py's Msg has for the same
    message (read here through a second consumer on a plain client), and acks as one."""
    js = nc.jetstream()
    await publish(js, 120)
    puller = WatchedPuller(nc)
    await puller.start()
    got = await puller.fetch(200, timeout=5)  # 120 ready, then JetStream's 404 ends it
    assert len(got) == 120
    assert all(type(m) is Delivery for m in got)
    assert puller.through_nats_py == []
    assert nc.direct_deliveries >= 121  # 120 messages and the 404 status

    plain = await nats.connect(nats_server.url)
    try:
        pjs = plain.jetstream()
        await pjs.add_consumer(STREAM, ConsumerConfig(durable_name="plain",
                                                      ack_policy=AckPolicy.EXPLICIT))
        reference = WatchedPuller(plain, consumer="plain")
        await reference.start()
        expected = await reference.fetch(200, timeout=5)
        assert len(reference.through_nats_py) >= 120  # the plain client: nats-py's path
        for d, m in zip(got, expected, strict=True):
            assert (d.subject, d.data, d.headers) == (m.subject, m.data, m.headers)
            assert d.reply.startswith(f"$JS.ACK.{STREAM}.{CONSUMER}.")
            assert d.metadata.sequence == m.metadata.sequence
            assert d.metadata.num_delivered == m.metadata.num_delivered == 1
        await reference.close()
    finally:
        await plain.close()

    assert await ack_pending(js) == 120
    await got[0].in_progress()  # nats-py's own Msg methods work on a Delivery
    await ack_all(nc, got)
    await until(lambda: _ack_pending_is(js, 0), message="every direct delivery acked")
    assert all(m.is_acked for m in got)
    await puller.close()


async def test_statuses_are_read_from_the_raw_header_line(
        nc: DeliveringClient) -> None:
    """404 (nothing more ready) ends a fetch at once, 409 (refused for now) makes it
    wait out its timeout, 503 (consumer gone) fails it: all read on the direct path."""
    js = nc.jetstream()
    puller = WatchedPuller(nc)
    await puller.start()
    await publish(js, 3)
    started = time.monotonic()
    assert len(await puller.fetch(10, timeout=10)) == 3
    assert time.monotonic() - started < 2  # the 404 ended it

    await js.add_consumer(STREAM, ConsumerConfig(durable_name="narrow", max_waiting=1,
                                                 deliver_policy=DeliverPolicy.NEW,
                                                 ack_policy=AckPolicy.EXPLICIT))
    holder, refused = WatchedPuller(nc, consumer="narrow"), WatchedPuller(nc, consumer="narrow")
    stop = asyncio.Event()
    lingering = asyncio.create_task(holder.fetch(1, timeout=20, interrupt=stop))
    await until(lambda: _waiting(js, "narrow"), message="the one allowed request is open")
    before = nc.direct_deliveries
    started = time.monotonic()
    assert await refused.fetch(1, timeout=1.0) == []
    assert time.monotonic() - started >= 0.9
    assert nc.direct_deliveries > before  # the 409 came the direct way
    stop.set()
    assert await asyncio.wait_for(lingering, 5) == []

    await js.delete_consumer(STREAM, CONSUMER)
    started = time.monotonic()
    with pytest.raises(PullFailed):
        await puller.fetch(1, timeout=10)
    assert time.monotonic() - started < 5
    for p in (puller, holder, refused):
        assert p.through_nats_py == []
        await p.close()


async def test_an_unusual_header_block_and_other_subscriptions_take_nats_pys_path(
        nc: DeliveringClient) -> None:
    """A header block the direct path does not know (here ``NATS/2.0``) is left to
    nats-py, which hands it to the puller's callback (kept, then fetched as a plain Msg
    with nats-py's headers); a subscription not registered gets plain Msgs."""
    puller = WatchedPuller(nc)
    await puller.start()
    before = nc.direct_deliveries
    block = b"NATS/2.0\r\nX-A: 1\r\n\r\n"
    await nc._send_command(b"HPUB %s %d %d\r\n%sbody\r\n"
                           % (f"{puller._prefix}x".encode(), len(block), len(block) + 4, block))
    await nc.flush()
    await until(lambda: puller.kept == 1, message="the unusual delivery is kept")
    got = await puller.fetch(1, timeout=5)
    assert [(type(m), m.data, m.headers) for m in got] == [(Msg, b"body", {"X-A": "1"})]
    assert puller.through_nats_py == got
    assert nc.direct_deliveries == before

    seen: list[Msg] = []

    async def cb(msg: Msg) -> None:
        seen.append(msg)

    await nc.subscribe("other.>", cb=cb)
    await nc.publish("other.x", b"1", headers={"A": "b"})
    await until(lambda: len(seen) == 1, message="the other subscription's message")
    assert type(seen[0]) is Msg and seen[0].headers == {"A": "b"}
    assert nc.direct_deliveries == before

    sub = puller._sub
    assert sub is not None
    await puller.close()
    assert sub._id not in nc._direct  # closed: nothing registered any more


async def test_only_a_plain_subscription_of_the_client_is_delivered_directly(
        nc: DeliveringClient, nats_server: EmbeddedNats) -> None:
    limited = await nc.subscribe("lim.>", max_msgs=5)
    with pytest.raises(ValueError, match="plain subscription"):
        nc.deliver_directly(limited, lambda *_: True)
    other = await nats.connect(nats_server.url)
    try:
        foreign = await other.subscribe("x.>")
        with pytest.raises(ValueError, match="plain subscription"):
            nc.deliver_directly(foreign, lambda *_: True)
    finally:
        await other.close()


async def test_a_compressed_batchs_encoding_header_is_read_from_a_direct_delivery(
        nc: DeliveringClient) -> None:
    """``Es-Encoding: zstd`` and ``Nats-Msg-Id`` parsed from the raw block on first read:
    the batch decodes as the shipper encoded it."""
    js = nc.jetstream()
    records = [Record(1_700_000_000_000_000 + s, CT_JSON, b'{"n": %d}' % s)
               for s in range(1, 11)]
    body, headers = encode_batch(Batch(1, "e1", "s", 7, 1, records), zstd_level=3)
    assert headers == {ENCODING_HEADER: "zstd"}
    headers["Nats-Msg-Id"] = msg_id("e1", "s", 7, 1, 10)
    await js.publish("d.e1.s", body, headers=headers)
    puller = WatchedPuller(nc)
    await puller.start()
    [m] = await puller.fetch(1, timeout=5)
    assert type(m) is Delivery
    assert m.headers == {ENCODING_HEADER: "zstd", "Nats-Msg-Id": "e1.s.7.1-10"}
    batch = decode_records(m.data, m.headers)
    assert (batch.edge, batch.stream, batch.span) == ("e1", "s", ("e1", "s", 7, 1, 10))
    assert [r.payload for r in batch.records] == [r.payload for r in records]
    await puller.close()


async def test_direct_delivery_survives_a_reconnect(nats_server: EmbeddedNats) -> None:
    """nats-py re-subscribes with the same sids after a reconnect: the registration
    still holds, and deliveries keep going direct."""
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    nc = await delivering_client(nats_server.url, reconnect_time_wait=0.1,
                                 max_reconnect_attempts=-1, reconnected_cb=on_reconnect)
    try:
        js = nc.jetstream()
        await add_stream(js)
        puller = WatchedPuller(nc)
        await puller.start()
        await publish(js, 5)
        first = await puller.fetch(5, timeout=5)
        assert len(first) == 5
        await ack_all(nc, first)
        await until(lambda: _ack_pending_is(js, 0), message="the first five acked")
        await nats_server.restart()
        await asyncio.wait_for(reconnected.wait(), 20)
        await publish(js, 5, start=5)
        before = nc.direct_deliveries
        got: list[Msg] = []
        deadline = time.monotonic() + 20
        while len(got) < 5 and time.monotonic() < deadline:
            got += await puller.fetch(5, timeout=1)
        assert [int(m.data) for m in got] == [5, 6, 7, 8, 9]
        assert all(type(m) is Delivery for m in got)
        assert puller.through_nats_py == []
        assert nc.direct_deliveries >= before + 5
        assert type(nc._ps) is FRAME_PARSER  # still the ingest's parser (reset, not replaced)
        await puller.close()
    finally:
        await nc.close()


async def test_the_ingest_receives_records_through_the_direct_path(
        nats_server: EmbeddedNats, pg_dsn: str) -> None:
    """The ingest's connection is a DeliveringClient and its workers' deliveries go direct."""
    probe = await nats.connect(nats_server.url)
    try:
        async with running_ingest(pg_dsn, nats_server.url) as ingest:
            js = probe.jetstream()
            subject = Topology().records_subject("e1", "s")
            for first in (1, 11, 21):
                records = [Record(1_700_000_000_000_000 + s, CT_JSON, b'{"n": %d}' % s)
                           for s in range(first, first + 10)]
                body, headers = encode_batch(Batch(1, "e1", "s", 3, first, records),
                                             zstd_level=3 if first == 11 else None)
                headers["Nats-Msg-Id"] = msg_id("e1", "s", 3, first, first + 9)
                await js.publish(subject, body, headers=headers)
            await wait_for_records(pg_dsn, 30)
            nc = ingest._nc
            assert isinstance(nc, DeliveringClient)
            assert nc.direct_deliveries >= 3
    finally:
        await probe.close()


def test_the_nats_py_internals_the_hook_relies_on_are_there() -> None:
    """What direct_delivery uses of nats-py's private surface, by name."""
    params = list(inspect.signature(NATS._process_msg).parameters)
    assert params == ["self", "sid", "subject", "reply", "data", "headers"]
    assert inspect.iscoroutinefunction(NATS._process_msg)
    client = NATS()
    assert isinstance(client._subs, dict)
    assert {"in_msgs", "in_bytes"} <= set(client.stats)
    sub = Subscription(client, 7, "s")
    assert (sub._id, sub._received, sub._max_msgs, sub._jsi) == (7, 0, 0, None)
    # The parser hands every message to _process_msg (what DeliveringClient overrides).
    assert "self.nc._process_msg(sid, subject, reply, payload, hdr)" in inspect.getsource(
        Parser.parse)
    # The client makes its parser once (DeliveringClient replaces it there) and resets it
    # on a reconnect; the parser's state is what the frame loop reads and leaves.
    assert "self._ps: Parser = Parser(self)" in inspect.getsource(NATS.__init__)
    assert "Parser(" not in inspect.getsource(NATS.connect)
    assert "Parser(" not in inspect.getsource(NATS._attempt_reconnect)
    parser = Parser(client)
    assert (parser.buf, parser.state) == (bytearray(), AWAITING_CONTROL_LINE)
    assert type(DeliveringClient()._ps) is FRAME_PARSER


async def _waiting(js: JetStreamContext, consumer: str) -> bool:
    return (await js.consumer_info(STREAM, consumer)).num_waiting >= 1


async def _ack_pending_is(js: JetStreamContext, n: int) -> bool:
    return await ack_pending(js) == n
