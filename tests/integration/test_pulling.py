"""The ingest's own pull requests and bulk acks, against a real nats-server: a fetch
returns what is ready without waiting out its timeout, a message delivered after its
fetch gave up is the next fetch's first, and a group's acks (one write) ack every
message as ``Msg.ack`` would; on nats-py's client and on the ingest's direct-delivery
client alike."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.errors import MsgAlreadyAckdError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from broker.runtime.embedded_nats import EmbeddedNats
from cloud_ingest.bulk_publishing import ack_all, publish_many
from cloud_ingest.direct_delivery import DeliveringClient
from cloud_ingest.pulling import Puller, PullFailed
from tests.support import until

STREAM, CONSUMER = "PULLS", "ingest"


@pytest.fixture(params=["nats-py", "direct"])
async def nc(nats_server: EmbeddedNats, request: pytest.FixtureRequest) -> AsyncIterator[NATS]:
    """nats-py's client (deliveries through its path and the puller's callback) and the
    ingest's (cloud_ingest.direct_delivery): the puller behaves the same on both."""
    if request.param == "direct":
        conn: NATS = DeliveringClient()
        await conn.connect(nats_server.url)
    else:
        conn = await nats.connect(nats_server.url)
    js = conn.jetstream()
    await js.add_stream(name=STREAM, subjects=["p.>"])
    await js.add_consumer(STREAM, ConsumerConfig(durable_name=CONSUMER,
                                                 ack_policy=AckPolicy.EXPLICIT, ack_wait=30))
    yield conn
    await conn.close()


@pytest.fixture
async def puller(nc: NATS) -> AsyncIterator[Puller]:
    p = Puller(nc, STREAM, CONSUMER)
    await p.start()
    yield p
    await p.close()


async def publish(js: JetStreamContext, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        await js.publish(f"p.e{i % 7}.s", str(i).encode(), headers={"Nats-Msg-Id": str(i)})


async def ack_pending(js: JetStreamContext) -> int:
    return (await js.consumer_info(STREAM, CONSUMER)).num_ack_pending


async def test_a_fetch_takes_what_is_ready_without_waiting_out_its_timeout(
        nc: NATS, puller: Puller) -> None:
    js = nc.jetstream()
    await publish(js, 25)
    first = await puller.fetch(10, timeout=5)
    started = time.monotonic()
    rest = await puller.fetch(100, timeout=5)  # 15 ready: JetStream's 404 ends the fetch
    assert time.monotonic() - started < 2
    assert [m.data for m in first + rest] == [str(i).encode() for i in range(25)]
    assert await puller.fetch(5, timeout=0.05) == []  # nothing left: empty, not an error


async def test_a_fetch_waits_for_a_message_that_comes_within_its_timeout(
        nc: NATS, puller: Puller) -> None:
    js = nc.jetstream()
    fetch = asyncio.create_task(puller.fetch(3, timeout=10))
    await until(lambda: _waiting(js), message="the lingering pull request is open")
    await publish(js, 3)
    got = await asyncio.wait_for(fetch, 5)
    assert [m.data for m in got] == [b"0", b"1", b"2"]


async def test_a_message_delivered_after_its_fetch_gave_up_is_the_next_fetchs_first(
        nc: NATS, puller: Puller) -> None:
    """The request lingers on the server after its fetch is interrupted: what JetStream
    then delivers to it is kept, not stranded until ack_wait."""
    js = nc.jetstream()
    stop = asyncio.Event()
    fetch = asyncio.create_task(puller.fetch(1, timeout=20, interrupt=stop))
    await until(lambda: _waiting(js), message="the lingering pull request is open")
    stop.set()
    assert await asyncio.wait_for(fetch, 5) == []
    await publish(js, 1)  # delivered to the request nobody waits on any more
    await until(lambda: puller.kept == 1, message="the late delivery is kept")
    started = time.monotonic()
    got = await puller.fetch(10, timeout=20)
    assert time.monotonic() - started < 2
    assert [m.data for m in got] == [b"0"]
    await ack_all(nc, got)
    await until(lambda: _ack_pending_is(js, 0), message="the kept message acked")


async def test_a_request_refused_for_now_waits_out_the_fetch_not_a_tight_loop(
        nc: NATS) -> None:
    """JetStream answers 409 (here: too many requests waiting); an idle worker's fetch
    must not come back at once, or it would ask again in a tight loop."""
    js = nc.jetstream()
    await js.add_consumer(STREAM, ConsumerConfig(durable_name="narrow", max_waiting=1,
                                                 ack_policy=AckPolicy.EXPLICIT))
    holder, refused = Puller(nc, STREAM, "narrow"), Puller(nc, STREAM, "narrow")
    stop = asyncio.Event()
    lingering = asyncio.create_task(holder.fetch(1, timeout=20, interrupt=stop))
    await until(lambda: _waiting(js, "narrow"), message="the one allowed request is open")
    started = time.monotonic()
    assert await refused.fetch(1, timeout=1.0) == []
    assert time.monotonic() - started >= 0.9
    stop.set()
    assert await asyncio.wait_for(lingering, 5) == []
    await holder.close()
    await refused.close()


async def test_a_fetch_from_a_consumer_that_is_gone_fails_at_once(
        nc: NATS, puller: Puller) -> None:
    await nc.jetstream().delete_consumer(STREAM, CONSUMER)
    started = time.monotonic()
    with pytest.raises(PullFailed):
        await puller.fetch(1, timeout=10)
    assert time.monotonic() - started < 5


async def test_ack_all_acks_every_message_as_msg_ack_would(nc: NATS, puller: Puller) -> None:
    js = nc.jetstream()
    await publish(js, 300)
    msgs = await puller.fetch(300, timeout=5)
    assert len(msgs) == 300
    assert await ack_pending(js) == 300
    await ack_all(nc, msgs)
    await until(lambda: _ack_pending_is(js, 0), message="every message acked")
    assert all(m.is_acked for m in msgs)
    with pytest.raises(MsgAlreadyAckdError):
        await msgs[0].ack()
    await ack_all(nc, msgs)  # acked already: nothing sent again
    assert (await js.consumer_info(STREAM, CONSUMER)).num_redelivered == 0


async def test_publish_many_refuses_a_subject_that_would_break_the_protocol(nc: NATS) -> None:
    """A subject with whitespace goes through nc.publish's own checks (which refuse it),
    never into the joined block where it could split a protocol line."""
    with pytest.raises(nats.errors.BadSubjectError):
        await publish_many(nc, [("p.ok", "", b"1"), ("p.bad 0\r\nPUB p.x", "", b"2")])
    assert nc.is_connected


async def test_publish_many_delivers_in_order_with_replies(nc: NATS) -> None:
    got: list[tuple[str, str, bytes]] = []

    async def seen(msg: nats.aio.msg.Msg) -> None:
        got.append((msg.subject, msg.reply, msg.data))

    await nc.subscribe("q.>", cb=seen)
    sent = [(f"q.{i}", f"r.{i}" if i % 2 else "", str(i).encode() * i) for i in range(50)]
    await publish_many(nc, sent)
    await until(lambda: len(got) == 50, message="all 50 delivered")
    assert got == sent


async def _waiting(js: JetStreamContext, consumer: str = CONSUMER) -> bool:
    return (await js.consumer_info(STREAM, consumer)).num_waiting >= 1


async def _ack_pending_is(js: JetStreamContext, n: int) -> bool:
    return await ack_pending(js) == n
