"""``send``: fire-and-forget records without a future each, whose failures are never silent.

Against the in-process fake bridge of test_sdk_client (the ingress protocol in
an ``httpx.MockTransport``, with scripted faults).
"""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from edge_bridge import sdk
from tests.unit.test_sdk_client import WAIT_S, FakeBridge, client_for, settled


@pytest.fixture
def bridge() -> FakeBridge:
    return FakeBridge()


def stored_payloads(bridge: FakeBridge, stream: str = "s") -> list[bytes]:
    return [record.payload for record in bridge.stored.get(stream, [])]


async def test_sent_records_arrive_once_in_order_and_flush_returns_when_durable(
    bridge: FakeBridge,
) -> None:
    """Records sent over several batches, one of whose answers is lost (and retried),
    are stored exactly once, in send order; ``flush`` returns once all are acknowledged."""
    bridge.script.extend([FakeBridge.store, FakeBridge.lose_response])
    async with client_for(bridge, batch_max_records=10) as client:
        for i in range(35):
            client.send("s", {"i": i}, key="k")
        await client.flush()
        assert client.stats.records_acked == 35
        assert client.stats.records_sent == 35 == client.stats.records_published
    assert stored_payloads(bridge) == [b'{"i":%d}' % i for i in range(35)]
    assert client.stats.records_failed == 0 and client.stats.retries == 1


async def test_a_batch_of_sent_records_holds_no_waiter_per_record(bridge: FakeBridge) -> None:
    """Records without a future are counted in their batch, not listed."""
    async with client_for(bridge) as client:
        for i in range(100):
            client.send("s", i)
        batch = client._pending["s"]
        assert batch.waiters == [] and batch.unwaited == 100 and batch.gaps is None
        assert batch.count == 100 == client.outstanding


async def test_futures_mixed_with_sent_records_get_their_own_records_seq(
    bridge: FakeBridge,
) -> None:
    """In a batch mixing ``send`` and ``publish``, each future resolves to its own record."""
    async with client_for(bridge) as client:
        futures: dict[int, asyncio.Future[sdk.RecordAck]] = {}
        for i in range(12):
            if i in (2, 3, 7, 11):
                futures[i] = client.publish("s", i)
            else:
                client.send("s", i)
        await client.flush()
        acks = await settled(futures.values())
    assert [ack.seq for ack in acks if isinstance(ack, sdk.RecordAck)] == [3, 4, 8, 12]
    assert stored_payloads(bridge) == [str(i).encode() for i in range(12)]


async def test_send_failures_are_counted_logged_once_per_batch_and_raised_by_flush_once(
    bridge: FakeBridge, caplog: pytest.LogCaptureFixture,
) -> None:
    """A rejected batch of sent records: one ``sdk_batch_failed`` line, counts by reason,
    and ``sdk.SendFailed`` from the next ``flush`` only."""
    bridge.default = FakeBridge.status(422, "malformed", "nope")
    async with client_for(bridge, batch_max_records=5) as client:
        for i in range(10):
            client.send("s", i)
        with pytest.raises(sdk.SendFailed) as raised:
            await client.flush()
        await client.flush()  # reported once: nothing new since
        stats = client.stats
    assert raised.value.records == 10
    assert raised.value.by_reason == {"invalid_input": 10}
    assert isinstance(raised.value.first_error, sdk.InvalidInput)
    assert "nope" in str(raised.value)
    assert stats.records_failed == stats.sent_records_failed == 10
    assert stats.failed_by_reason == {"invalid_input": 10}
    failures = [r for r in caplog.records if getattr(r, "event", None) == "sdk_batch_failed"]
    assert [r.records for r in failures] == [5, 5]  # type: ignore[attr-defined]  # from extra


async def test_close_raises_send_failed_for_records_the_close_timeout_failed(
    bridge: FakeBridge,
) -> None:
    """With the bridge silent, ``close`` gives up after its timeout, closes, and then
    raises ``sdk.SendFailed`` (not acknowledged); a second ``close`` returns quietly."""
    bridge.default = FakeBridge.hang
    client = client_for(bridge, linger_ms=0.0)
    async with asyncio.timeout(WAIT_S):
        async with client:
            client.send("s", 1)
            client.send("s", 2)
            await bridge.until(lambda: bridge.in_flight == 1)
            with pytest.raises(sdk.SendFailed) as raised:
                await client.close(timeout=0.1)
            assert client.closed
            await client.close()
    assert raised.value.by_reason == {"not_acknowledged": 2}
    assert client.stats.records_unacknowledged == 2


async def test_an_abort_is_reported_by_the_following_close(bridge: FakeBridge) -> None:
    bridge.default = FakeBridge.hang
    client = client_for(bridge)
    async with client:
        client.send("s", 1)
        await client.abort()
        with pytest.raises(sdk.SendFailed, match="1 records sent with send"):
            await client.close()


async def test_send_pushes_back_with_buffer_full_beyond_max_pending_records(
    bridge: FakeBridge,
) -> None:
    """Back-pressure as for ``publish``: refused synchronously, accepted again once the
    bridge has confirmed what was pending."""
    gate = asyncio.Event()
    bridge.default = FakeBridge.gated(gate)
    async with client_for(bridge, max_pending_records=3, linger_ms=0.0) as client:
        for i in range(3):
            client.send("s", i)
        with pytest.raises(sdk.BufferFull, match="max_pending_records=3"):
            client.send("s", 3)
        gate.set()
        await client.flush()
        client.send("s", 3)
    assert stored_payloads(bridge) == [b"0", b"1", b"2", b"3"]
    assert client.stats.records_failed == 0


async def test_bad_input_to_send_raises_synchronously_and_nothing_is_queued(
    bridge: FakeBridge,
) -> None:
    async with client_for(bridge, max_record_bytes=64) as client:
        with pytest.raises(sdk.InvalidInput, match="invalid stream name"):
            client.send("no.dots", 1)
        with pytest.raises(sdk.InvalidInput, match="key"):
            client.send("s", 1, key="x" * 2000)
        with pytest.raises(sdk.InvalidInput, match="header"):
            client.send("s", 1, headers={"h": 1})  # type: ignore[dict-item]
        with pytest.raises(sdk.RecordTooLarge):
            client.send("s", b"x" * 100)
        assert client.outstanding == 0 and client.stats.records_published == 0
    assert bridge.requests == []
    with pytest.raises(sdk.ClosedError):
        client.send("s", 1)


async def test_send_on_a_client_never_entered_binds_it_to_the_running_loop(
    bridge: FakeBridge,
) -> None:
    client = sdk.EdgeClient(transport=httpx.MockTransport(bridge.handle), linger_ms=0.0)
    client.send("s", 1)
    await client.close()
    assert stored_payloads(bridge) == [b"1"]


# -- the synchronous client ----------------------------------------------------------------


def test_the_sync_client_sends_from_several_threads_and_loses_nothing(
    bridge: FakeBridge,
) -> None:
    """Four threads send concurrently (and one publishes among them): every record is
    stored exactly once, and each thread's records keep their order."""
    per_thread, threads = 2_000, 4
    with sdk.SyncEdgeClient(
        transport=httpx.MockTransport(bridge.handle), batch_max_records=128, linger_ms=1.0
    ) as client:

        def produce(t: int) -> None:
            for i in range(per_thread):
                client.send("s", {"t": t, "i": i})

        workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        future = client.publish("s", {"t": -1, "i": 0})
        for worker in workers:
            worker.join(WAIT_S)
        client.flush(timeout=WAIT_S)
        assert future.result(timeout=0).stream == "s"
        assert client.stats.records_acked == per_thread * threads + 1
        assert client.stats.records_sent == per_thread * threads
    payloads = stored_payloads(bridge)
    assert len(payloads) == len(set(payloads)) == per_thread * threads + 1
    for t in range(threads):
        mine = [p for p in payloads if p.startswith(b'{"t":%d,' % t)]
        assert mine == [b'{"t":%d,"i":%d}' % (t, i) for i in range(per_thread)]


def test_the_sync_client_reports_send_failures_from_flush_and_close_once(
    bridge: FakeBridge,
) -> None:
    bridge.default = FakeBridge.status(422, "malformed", "nope")
    client = sdk.SyncEdgeClient(transport=httpx.MockTransport(bridge.handle), linger_ms=0.0)
    client.send("s", 1)
    with pytest.raises(sdk.SendFailed) as raised:
        client.flush(timeout=WAIT_S)
    assert raised.value.by_reason == {"invalid_input": 1}
    client.send("s", 2)
    with pytest.raises(sdk.SendFailed, match="1 records sent with send"):
        client.close(timeout=WAIT_S)
    client.close()  # reported once
    with pytest.raises(sdk.ClosedError):
        client.send("s", 3)
    assert client.stats.sent_records_failed == 2


def test_the_sync_client_send_raises_in_the_calling_thread(bridge: FakeBridge) -> None:
    with sdk.SyncEdgeClient(transport=httpx.MockTransport(bridge.handle), linger_ms=60_000.0,
                        max_pending_records=2) as client:
        with pytest.raises(sdk.InvalidInput, match="invalid stream name"):
            client.send("no.dots", b"x")
        client.send("s", b"x")
        client.send("s", b"y")
        with pytest.raises(sdk.BufferFull):
            client.send("s", b"z")
        client.flush(timeout=WAIT_S)
    assert stored_payloads(bridge) == [b"x", b"y"]


async def test_any_mix_of_send_and_publish_gives_each_future_its_records_seq(
    bridge: FakeBridge,
) -> None:
    """Whatever the interleaving (runs of either, across batch boundaries), future ``i``
    resolves to the seq of the record published with it."""
    pattern = "ppsspssspppsppspsssssp" * 7
    async with client_for(bridge, batch_max_records=13) as client:
        futures: list[tuple[int, asyncio.Future[sdk.RecordAck]]] = []
        for i, kind in enumerate(pattern):
            if kind == "p":
                futures.append((i, client.publish("s", i)))
            else:
                client.send("s", i)
        await client.flush()
        acks = await settled(future for _, future in futures)
    seqs = [ack.seq for ack in acks if isinstance(ack, sdk.RecordAck)]
    assert seqs == [i + 1 for i, _ in futures]
    assert stored_payloads(bridge) == [str(i).encode() for i in range(len(pattern))]


def test_the_sync_client_send_from_its_own_loop_thread_does_not_wait_on_itself(
    bridge: FakeBridge,
) -> None:
    """A future's callback (run on the loop thread) may send more than a hand-over chunk:
    the thread that would take the chunk never waits for itself."""
    with sdk.SyncEdgeClient(transport=httpx.MockTransport(bridge.handle), linger_ms=0.0) as client:
        done = threading.Event()

        def send_many(_: object) -> None:
            for i in range(3_000):
                client.send("s", i)
            done.set()

        client.publish("s", -1).add_done_callback(send_many)
        assert done.wait(WAIT_S)
        client.flush(timeout=WAIT_S)
    assert len(stored_payloads(bridge)) == 3_001


# -- the inline path: a common record into its stream's open batch --------------------------


async def test_send_into_an_open_batch_seals_it_at_its_byte_and_record_limits(
    bridge: FakeBridge,
) -> None:
    """Dict records after a batch's first take ``send``'s inline path; a batch still
    never exceeds ``batch_max_bytes`` (each record charged payload + key + 16) nor
    ``batch_max_records``, and every record arrives once, in order."""
    async with client_for(bridge, batch_max_bytes=90, linger_ms=60_000.0) as client:
        for i in range(10, 30):  # {"i":NN} is 8 bytes: 8 + 1 + 16 = 25 per record
            client.send("s", {"i": i}, key="k")
        await client.flush()
    assert [len(seen.body.records) for seen in bridge.requests] == [3] * 6 + [2]
    async with client_for(bridge, batch_max_records=3, linger_ms=60_000.0) as client:
        for i in range(30, 40):
            client.send("s", {"i": i}, key="k")
        await client.flush()
    assert [len(seen.body.records) for seen in bridge.requests[7:]] == [3, 3, 3, 1]
    assert stored_payloads(bridge) == [b'{"i":%d}' % i for i in range(10, 40)]
    assert client.stats.records_sent == 10 == client.stats.records_acked


async def test_send_into_an_open_batch_pushes_back_at_max_pending_records(
    bridge: FakeBridge,
) -> None:
    """The inline path refuses with ``BufferFull`` where the general one would."""
    async with client_for(bridge, max_pending_records=3, linger_ms=60_000.0) as client:
        for i in range(3):
            client.send("s", {"i": i}, key="k")
        with pytest.raises(sdk.BufferFull, match="max_pending_records=3"):
            client.send("s", {"i": 3}, key="k")
        assert client.outstanding == 3 == client._pending["s"].count
        await client.flush()
    assert stored_payloads(bridge) == [b'{"i":%d}' % i for i in range(3)]


async def test_send_into_an_open_batch_refuses_what_the_general_path_refuses(
    bridge: FakeBridge,
) -> None:
    """With a batch open for the stream, bad input still raises synchronously, as
    ``publish`` does, and adds nothing to the batch; a closed client refuses."""
    async with client_for(bridge, max_record_bytes=64, linger_ms=60_000.0) as client:
        client.send("s", {"a": 1}, key="k")
        with pytest.raises(sdk.InvalidInput, match="u0000"):
            client.send("s", {"text": "a\x00b"}, key="k")
        with pytest.raises(sdk.InvalidInput, match="JSON-encodable"):
            client.send("s", {"when": object()}, key="k")
        with pytest.raises(sdk.RecordTooLarge, match="max_record_bytes=64"):
            client.send("s", {"text": "x" * 100}, key="k")
        with pytest.raises(sdk.InvalidInput, match="key"):
            client.send("s", {"a": 1}, key="x" * 2000)
        with pytest.raises(sdk.InvalidInput, match="key"):
            client.send("s", {"a": 1}, key="a\x00b")
        with pytest.raises(sdk.InvalidInput, match="stream"):
            client.send(["s"], {"a": 1})  # type: ignore[arg-type]
        with pytest.raises(sdk.InvalidInput, match="header"):
            client.send("s", {"a": 1}, headers={"h": 1})  # type: ignore[dict-item]
        assert client._pending["s"].count == 1 == client.stats.records_sent
    assert stored_payloads(bridge) == [b'{"a":1}']
    with pytest.raises(sdk.ClosedError):
        client.send("s", {"a": 1}, key="k")


def test_the_sync_client_seals_batches_at_their_byte_and_record_limits(
    bridge: FakeBridge,
) -> None:
    """Records handed over by a thread join their stream's open batch on the loop
    thread; a batch still never exceeds ``batch_max_bytes`` nor ``batch_max_records``,
    a publish among them keeps its place, and the counters are exact."""
    with sdk.SyncEdgeClient(transport=httpx.MockTransport(bridge.handle), batch_max_bytes=90,
                            linger_ms=60_000.0) as client:
        for i in range(10, 30):  # {"i":NN} is 8 bytes: 8 + 1 + 16 = 25 per record
            client.send("s", {"i": i}, key="k")
        client.flush(timeout=WAIT_S)
        assert client.stats.records_published == 20 == client.stats.records_sent
    assert [len(seen.body.records) for seen in bridge.requests] == [3] * 6 + [2]
    with sdk.SyncEdgeClient(transport=httpx.MockTransport(bridge.handle), batch_max_records=3,
                            linger_ms=60_000.0) as client:
        for i in range(30, 34):
            client.send("s", {"i": i}, key="k")
        future = client.publish("s", {"i": 34}, key="k")
        for i in range(35, 40):
            client.send("s", {"i": i}, key="k")
        client.flush(timeout=WAIT_S)
        assert future.result(timeout=0).seq == 25
        assert client.stats.records_published == 10 and client.stats.records_sent == 9
    assert [len(seen.body.records) for seen in bridge.requests[7:]] == [3, 3, 3, 1]
    assert stored_payloads(bridge) == [b'{"i":%d}' % i for i in range(10, 40)]
