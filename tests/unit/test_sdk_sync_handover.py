"""The synchronous client's hand-over without a lock: ``send``'s common record, and
records handed over while ``close`` runs (each is either delivered or refused in
its sender's thread, never left behind).

Against the in-process fake bridge of test_sdk_client. The races with ``close``
are made deterministic by wrapping the client's record preparation, which runs in
the calling thread just before the hand-over.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from broker.protocol.wire import CT_JSON
from edge_bridge import sdk
from tests.unit.test_sdk_client import WAIT_S, FakeBridge


@pytest.fixture
def bridge() -> FakeBridge:
    return FakeBridge()


def sync_client(bridge: FakeBridge, **options: float) -> sdk.SyncEdgeClient:
    return sdk.SyncEdgeClient(transport=httpx.MockTransport(bridge.handle), **options)


def stored(bridge: FakeBridge, stream: str = "s") -> list[tuple[bytes, str | None]]:
    return [(record.payload, record.key) for record in bridge.stored.get(stream, [])]


def test_send_of_a_common_record_on_a_known_stream_is_the_record_prepare_makes(
    bridge: FakeBridge,
) -> None:
    """After a stream's first record, ``send`` builds its common records (a dict, no ts,
    no headers, a plain key) itself: stored as the general way stores them (payload,
    key, content type, an event time of now), and what that way refuses it refuses
    too, in the calling thread, adding nothing."""
    before_us = time.time_ns() // 1000
    with sync_client(bridge, max_record_bytes=64, linger_ms=60_000.0) as client:
        client.send("s", {"i": 0}, key="k")  # the stream becomes known
        client.send("s", {"i": 1}, key="k")
        client.send("s", {"i": 2})
        with pytest.raises(sdk.InvalidInput, match="stream"):
            client.send("no.dots", {"i": 3})
        with pytest.raises(sdk.InvalidInput, match="u0000"):
            client.send("s", {"text": "a\x00b"}, key="k")
        with pytest.raises(sdk.RecordTooLarge, match="max_record_bytes=64"):
            client.send("s", {"text": "x" * 100}, key="k")
        with pytest.raises(sdk.InvalidInput, match="key"):
            client.send("s", {"i": 4}, key="a\x00b")
        with pytest.raises(sdk.InvalidInput, match="JSON-encodable"):
            client.send("s", {"when": object()})
        client.flush(timeout=WAIT_S)
        assert client.stats.records_sent == 3 == client.stats.records_acked
    after_us = time.time_ns() // 1000
    assert stored(bridge) == [(b'{"i":0}', "k"), (b'{"i":1}', "k"), (b'{"i":2}', None)]
    records = bridge.stored["s"]
    assert [record.ct for record in records] == [CT_JSON] * 3
    assert [record.headers for record in records] == [None] * 3
    assert all(before_us <= record.ts <= after_us for record in records)


def test_a_record_handed_over_after_closes_last_drain_is_refused_in_its_thread(
    bridge: FakeBridge, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``close`` completes (its last drain taken, the loop stopped) while a thread is
    between validating a record and handing it over: that thread gets ``ClosedError``,
    and the record is neither stored nor left in the intake nor counted as failed."""
    client = sync_client(bridge, linger_ms=0.0)
    client.send("s", {"i": 0})
    prepare = client._prepare

    def prepare_while_closing(*args: object) -> object:
        prepared = prepare(*args)  # type: ignore[arg-type]
        closer = threading.Thread(target=client.close)
        closer.start()
        closer.join(WAIT_S)
        assert not closer.is_alive()
        return prepared

    monkeypatch.setattr(client, "_prepare", prepare_while_closing)
    with pytest.raises(sdk.ClosedError):
        client.publish("s", {"i": 1})
    assert not client._intake
    assert client.stats.records_failed == 0 and client.stats.records_acked == 1
    assert stored(bridge) == [(b'{"i":0}', None)]


def test_a_record_handed_over_before_closes_last_drain_is_delivered_by_close(
    bridge: FakeBridge, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``close`` has begun (the client reports closed) but its last drain has not run
    yet when a thread hands a record over: the record is accepted, and ``close``
    delivers it before it returns."""
    client = sync_client(bridge, linger_ms=0.0)
    release_loop = threading.Event()
    client._loop.call_soon_threadsafe(release_loop.wait, WAIT_S)  # holds the loop thread
    close_began = threading.Event()
    aclose = client._aclose

    def aclose_noted(timeout: object) -> object:
        close_began.set()  # close() has set closed; its drain waits for the loop thread
        return aclose(timeout)  # type: ignore[arg-type]

    monkeypatch.setattr(client, "_aclose", aclose_noted)
    closer = threading.Thread(target=client.close)
    prepare = client._prepare

    def prepare_as_close_begins(*args: object) -> object:
        prepared = prepare(*args)  # type: ignore[arg-type]
        closer.start()
        assert close_began.wait(WAIT_S) and client.closed
        return prepared

    monkeypatch.setattr(client, "_prepare", prepare_as_close_begins)
    future = client.publish("s", {"i": 1})
    release_loop.set()
    closer.join(WAIT_S)
    assert not closer.is_alive()
    assert future.result(timeout=0).seq == 1
    assert stored(bridge) == [(b'{"i":1}', None)]
    with pytest.raises(sdk.ClosedError):
        client.send("s", {"i": 2})


def test_threads_sending_while_close_runs_each_record_is_stored_or_refused_in_its_thread(
    bridge: FakeBridge,
) -> None:
    """Four threads send flat out while another thread closes the client: every record
    a thread's ``send`` accepted is stored, once; the others raised ``ClosedError``."""
    client = sync_client(bridge, linger_ms=0.0, batch_max_records=64)
    accepted: dict[int, int] = {}
    going = threading.Event()

    def produce(t: int) -> None:
        i = 0
        try:
            while True:
                client.send("s", {"t": t, "i": i})
                i += 1
                if i == 2_000:
                    going.set()
        except sdk.ClosedError:
            accepted[t] = i

    workers = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    for worker in workers:
        worker.start()
    assert going.wait(WAIT_S)  # close while every thread may be mid-hand-over
    client.close(timeout=WAIT_S)
    for worker in workers:
        worker.join(WAIT_S)
    assert len(accepted) == 4 and client.stats.records_failed == 0
    payloads = [payload for payload, _ in stored(bridge)]
    assert len(payloads) == len(set(payloads)) == sum(accepted.values())
    for t, count in accepted.items():
        mine = [p for p in payloads if p.startswith(b'{"t":%d,' % t)]
        assert mine == [b'{"t":%d,"i":%d}' % (t, i) for i in range(count)]
