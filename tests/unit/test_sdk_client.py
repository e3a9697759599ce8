"""The SDK clients against an in-process fake bridge that speaks the ingress protocol.

The fake runs inside an ``httpx.MockTransport``: it decodes each request as the
real ingress would, stores records with dense per-stream seqs, de-duplicates
on ``(producer, request_seq)``, and follows a script of faults. End-to-end
tests against the real bridge live in tests/integration.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import pytest

import edge_bridge.sdk
from broker import errors
from broker.errors import EdgesyncError
from broker.protocol.ingress import IngressRequest
from broker.protocol.wire import Record
from edge_bridge.sdk import (
    BufferFull,
    ClosedError,
    EdgeClient,
    Forbidden,
    InvalidInput,
    RecordAck,
    RecordTooLarge,
    SendFailed,
    SyncEdgeClient,
    TemporaryError,
    Unauthorized,
)
from edge_bridge.sdk._answers import retry_after_s
from edge_bridge.sdk._defaults import RETRY_AFTER_MIN_S
from edge_bridge.sdk._http import Answer

WAIT_S = 10.0
"""Upper bound on any wait for a condition; a healthy run takes milliseconds."""

Action = Callable[["FakeBridge", httpx.Request, IngressRequest], Awaitable[httpx.Response]]


@dataclass(frozen=True)
class Seen:
    """One request as the fake bridge received it."""

    stream: str
    body: IngressRequest
    at: float


class FakeBridge:
    """The ingress protocol, in memory, with scripted faults.

    ``script`` holds the actions for the next requests, in order; once it is
    empty, ``default`` answers. Actions are the ``store`` / ``lose_response``
    / ``refuse`` / ``status`` / ``hang`` methods below.
    """

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.stored: dict[str, list[Record]] = {}
        self.epochs: dict[str, int] = {}
        self.answers: dict[tuple[str, int], dict[str, Any]] = {}
        self.script: deque[Action] = deque()
        self.default: Action = FakeBridge.store
        self.in_flight = 0
        self.peak_in_flight = 0
        self.changed = asyncio.Condition()
        self._decoder = msgspec.msgpack.Decoder(IngressRequest)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        assert request.method == "POST"
        assert request.headers["content-type"] == "application/msgpack"
        parts = request.url.path.split("/")
        assert parts[:3] == ["", "v1", "streams"] and parts[4] == "records", request.url.path
        body = self._decoder.decode(request.content)
        self.requests.append(Seen(parts[3], body, time.monotonic()))
        action = self.script.popleft() if self.script else self.default
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        await self._notify()
        try:
            return await action(self, request, body)
        finally:
            self.in_flight -= 1
            await self._notify()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate`` holds, re-checking whenever a request comes or goes."""
        async with asyncio.timeout(WAIT_S), self.changed:
            await self.changed.wait_for(predicate)

    def _store(self, request: httpx.Request, body: IngressRequest) -> dict[str, Any]:
        stream = request.url.path.split("/")[3]
        ident = (body.producer, body.request_seq)
        if ident in self.answers:
            return {**self.answers[ident], "duplicate": True}
        records = self.stored.setdefault(stream, [])
        epoch = self.epochs.setdefault(stream, 1000 + len(self.epochs))
        answer = {"epoch": epoch, "first_seq": len(records) + 1, "count": len(body.records)}
        records.extend(body.records)
        self.answers[ident] = answer
        return {**answer, "duplicate": False}

    async def store(self, request: httpx.Request, body: IngressRequest) -> httpx.Response:
        return httpx.Response(200, json=self._store(request, body))

    async def lose_response(self, request: httpx.Request, body: IngressRequest) -> httpx.Response:
        """Store the records, then drop the connection before the answer arrives."""
        self._store(request, body)
        raise httpx.ReadError("connection reset by peer", request=request)

    async def refuse(self, request: httpx.Request, body: IngressRequest) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async def hang(self, request: httpx.Request, body: IngressRequest) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    @staticmethod
    def status(code: int, error: str, message: str, retry_after: str | None = None) -> Action:
        async def answer(bridge: FakeBridge, r: httpx.Request, b: IngressRequest) -> httpx.Response:
            headers = {"Retry-After": retry_after} if retry_after is not None else {}
            return httpx.Response(code, json={"error": error, "message": message}, headers=headers)

        return answer

    @staticmethod
    def gated(gate: asyncio.Event) -> Action:
        """Store only once ``gate`` is set: holds requests in flight."""

        async def answer(bridge: FakeBridge, r: httpx.Request, b: IngressRequest) -> httpx.Response:
            await gate.wait()
            return await bridge.store(r, b)

        return answer


@pytest.fixture
def bridge() -> FakeBridge:
    return FakeBridge()


def client_for(bridge: FakeBridge, **options: Any) -> EdgeClient:
    """An EdgeClient wired to ``bridge``; linger is long unless a test wants it."""
    options.setdefault("linger_ms", 60_000.0)
    return EdgeClient(transport=httpx.MockTransport(bridge.handle), **options)


async def settled(futures: Iterable[asyncio.Future[RecordAck]]) -> list[RecordAck | BaseException]:
    """Every future's outcome, waiting at most WAIT_S."""
    async with asyncio.timeout(WAIT_S):
        return await asyncio.gather(*futures, return_exceptions=True)


def record_counts(bridge: FakeBridge) -> list[int]:
    return [len(seen.body.records) for seen in bridge.requests]


# -- batching ------------------------------------------------------------------------------


async def test_a_batch_is_sent_as_soon_as_it_holds_batch_max_records(bridge: FakeBridge) -> None:
    """Full batches go out at once; the remainder waits for linger or flush."""
    async with client_for(bridge, batch_max_records=10) as client:
        futures = [client.publish("s", {"i": i}) for i in range(25)]
        await settled(futures[:20])
        assert record_counts(bridge) == [10, 10]
        assert not any(f.done() for f in futures[20:])
        await client.flush()
        assert record_counts(bridge) == [10, 10, 5]
        assert all(f.done() for f in futures)


async def test_a_batch_is_sent_linger_ms_after_its_first_record(bridge: FakeBridge) -> None:
    """Without flush, a part-full batch is sent once linger_ms has passed, in one request."""
    async with client_for(bridge, linger_ms=30.0) as client:
        started = time.monotonic()
        futures = [client.publish("s", b"x") for _ in range(3)]
        acks = await settled(futures)
        assert all(isinstance(ack, RecordAck) for ack in acks)
        assert record_counts(bridge) == [3]
        assert bridge.requests[0].at - started >= 0.025  # timers may fire a hair early


async def test_a_batch_is_sealed_before_it_would_exceed_batch_max_bytes(
    bridge: FakeBridge,
) -> None:
    """Records of 100 bytes (+16 overhead) with a 3-record byte budget go 3 by 3."""
    async with client_for(bridge, batch_max_bytes=3 * 116) as client:
        futures = [client.publish("s", b"x" * 100) for _ in range(7)]
        await settled(futures[:6])
        assert record_counts(bridge) == [3, 3]
        await client.flush()
        assert record_counts(bridge) == [3, 3, 1]


async def test_linger_zero_sends_what_was_published_in_the_same_loop_iteration(
    bridge: FakeBridge,
) -> None:
    """linger_ms=0 still batches a synchronous burst, then sends it without delay."""
    async with client_for(bridge, linger_ms=0.0) as client:
        await settled([client.publish("s", i) for i in range(5)])
        assert record_counts(bridge) == [5]


# -- acknowledgements ----------------------------------------------------------------------


async def test_each_future_resolves_to_its_own_records_stream_epoch_and_seq(
    bridge: FakeBridge,
) -> None:
    """seq = first_seq + index in the batch: the ack names exactly the stored record."""
    async with client_for(bridge, batch_max_records=4) as client:
        published: list[tuple[str, bytes, asyncio.Future[RecordAck]]] = []
        for i in range(16):
            stream = "a" if i % 3 else "b"
            payload = f"{stream}-{i}".encode()
            published.append((stream, payload, client.publish(stream, payload, key=str(i))))
        await client.flush()
    for stream, payload, future in published:
        ack = future.result()
        assert ack.stream == stream
        assert ack.epoch == bridge.epochs[stream]
        assert bridge.stored[stream][ack.seq - 1].payload == payload
    assert len(bridge.stored["a"]) + len(bridge.stored["b"]) == 16


async def test_publish_wait_returns_the_ack_once_the_record_is_durable(bridge: FakeBridge) -> None:
    """publish_wait is publish plus await; the record is stored when it returns."""
    async with client_for(bridge, linger_ms=1.0) as client:
        ack = await client.publish_wait("s", {"v": 1}, key="k", headers={"h": "1"}, ts=1.5)
    assert ack == RecordAck("s", bridge.epochs["s"], 1)
    assert bridge.stored["s"] == [Record(1_500_000, 1, b'{"v":1}', "k", {"h": "1"})]


async def test_request_seqs_are_unique_per_batch_and_a_restart_starts_above_them(
    bridge: FakeBridge,
) -> None:
    """Each sealed batch gets the next seq; a new client with the same producer id goes higher,
    so the bridge never mistakes a restarted producer's request for a duplicate."""
    async with client_for(bridge, producer_id="plc-1", batch_max_records=2) as client:
        await settled([client.publish("s", i) for i in range(6)])
    async with client_for(bridge, producer_id="plc-1", batch_max_records=2) as client:
        await settled([client.publish("s", i) for i in range(2)])
    seqs = [seen.body.request_seq for seen in bridge.requests]
    assert {seen.body.producer for seen in bridge.requests} == {"plc-1"}
    assert len(set(seqs[:3])) == 3 and seqs[3] > max(seqs[:3])
    assert len(bridge.stored["s"]) == 8


# -- retries -------------------------------------------------------------------------------


async def test_a_lost_response_is_retried_with_the_same_request_id_and_stored_once(
    bridge: FakeBridge,
) -> None:
    """The bridge stored the batch but the answer was lost: the retry resends the same
    producer and request_seq, gets the original ack back, and nothing is stored twice."""
    bridge.script.append(FakeBridge.lose_response)
    async with client_for(bridge) as client:
        futures = [client.publish("s", i) for i in range(3)]
        await client.flush()
    assert [f.result().seq for f in futures] == [1, 2, 3]
    first, retry = bridge.requests
    assert (retry.body.producer, retry.body.request_seq) == (
        first.body.producer,
        first.body.request_seq,
    )
    assert retry.body.records == first.body.records
    assert len(bridge.stored["s"]) == 3
    assert (client.stats.requests_sent, client.stats.retries) == (2, 1)
    assert (client.stats.records_acked, client.stats.records_failed) == (3, 0)


async def test_a_5xx_answer_is_retried(bridge: FakeBridge) -> None:
    """A server error is temporary: retried with backoff until it succeeds."""
    bridge.script.extend([FakeBridge.status(500, "internal", "oops")] * 2)
    async with client_for(bridge) as client:
        future = client.publish("s", 1)
        await client.flush()
    assert future.result().seq == 1
    assert len(bridge.requests) == 3
    assert len({seen.body.request_seq for seen in bridge.requests}) == 1


async def test_503_with_retry_after_is_honoured_then_succeeds(bridge: FakeBridge) -> None:
    """Back-pressure: the retry waits the Retry-After delay, then the records are stored."""
    bridge.script.append(FakeBridge.status(503, "buffer_full", "buffer full", retry_after="0.2"))
    async with client_for(bridge) as client:
        future = client.publish("s", 1)
        await client.flush()
    assert future.result().seq == 1
    first, retry = bridge.requests
    assert retry.at - first.at >= 0.19
    assert retry.body.request_seq == first.body.request_seq


async def test_a_bridge_full_until_the_deadline_fails_the_records_with_buffer_full(
    bridge: FakeBridge,
) -> None:
    """Retry-After is retried until retry_timeout_s, then BufferFull carries the delay."""
    bridge.default = FakeBridge.status(503, "buffer_full", "full", retry_after="0.05")
    async with client_for(bridge, retry_timeout_s=0.3, linger_ms=0.0) as client:
        [outcome] = await settled([client.publish("s", 1)])
    assert isinstance(outcome, BufferFull)
    assert outcome.retry_after == pytest.approx(0.05)
    assert len(bridge.requests) >= 3


async def test_an_unreachable_bridge_fails_the_records_with_temporary_error_at_the_deadline(
    bridge: FakeBridge,
) -> None:
    """Connection errors are retried (same request id) until retry_timeout_s, then
    TemporaryError says the outcome is unknown."""
    bridge.default = FakeBridge.refuse
    async with client_for(bridge, retry_timeout_s=0.3, linger_ms=0.0) as client:
        started = time.monotonic()
        outcomes = await settled([client.publish("s", i) for i in range(3)])
        elapsed = time.monotonic() - started
    assert all(isinstance(o, TemporaryError) for o in outcomes)
    assert "may or may not be stored" in str(outcomes[0])
    assert outcomes[0] is not outcomes[1]  # one exception per record, no shared traceback
    assert 0.3 <= elapsed < 0.3 + 2.0
    assert len(bridge.requests) >= 3
    assert len({seen.body.request_seq for seen in bridge.requests}) == 1
    assert client.stats.records_failed == 3


@pytest.mark.parametrize(
    ("code", "error_type"),
    [(400, InvalidInput), (401, Unauthorized), (403, Forbidden), (413, RecordTooLarge),
     (415, InvalidInput), (422, InvalidInput)],
)
async def test_a_4xx_answer_fails_the_records_with_the_bridges_message_and_is_not_retried(
    bridge: FakeBridge, code: int, error_type: type[EdgesyncError]
) -> None:
    """Permanent rejections fail every record of the batch at once, carrying the message;
    a token refused (401, 403) fails them as such, not as bad input."""
    bridge.default = FakeBridge.status(code, "bad_thing", "the bridge explains why")
    async with client_for(bridge, linger_ms=0.0) as client:
        outcomes = await settled([client.publish("s", i) for i in range(2)])
    for outcome in outcomes:
        assert type(outcome) is error_type
        assert "the bridge explains why" in str(outcome)
        assert f"HTTP {code} bad_thing" in str(outcome)
    assert len(bridge.requests) == 1
    assert client.stats.retries == 0
    assert client.stats.failed_by_reason == {error_type.default_code: 2}


async def test_a_failed_batch_is_logged_once_not_once_per_record(
    bridge: FakeBridge, caplog: pytest.LogCaptureFixture,
) -> None:
    """Fire-and-forget publishers see one sdk_batch_failed error naming the record count."""
    bridge.default = FakeBridge.status(422, "malformed", "nope")
    async with client_for(bridge) as client:
        for i in range(5):
            client.publish("s", i)
    failures = [r for r in caplog.records if getattr(r, "event", None) == "sdk_batch_failed"]
    assert len(failures) == 1
    assert failures[0].levelno == logging.ERROR
    assert failures[0].records == 5  # type: ignore[attr-defined]  # from extra
    assert failures[0].error_type == "InvalidInput"  # type: ignore[attr-defined]


def test_retry_after_is_read_as_seconds_or_an_http_date_and_floored() -> None:
    """Both Retry-After forms are understood; 0 cannot make the client spin."""

    def parsed(value: str) -> float | None:
        return retry_after_s(Answer(503, {"retry-after": value}, b""))

    assert parsed("2") == 2.0
    assert parsed("0") == RETRY_AFTER_MIN_S
    assert parsed("Wed, 21 Oct 2015 07:28:00 GMT") == RETRY_AFTER_MIN_S  # in the past
    assert parsed("soon") is None


async def test_cancelling_one_records_future_does_not_disturb_the_others(
    bridge: FakeBridge,
) -> None:
    """A cancelled future only stops that caller waiting; its batch still goes through."""
    async with client_for(bridge) as client:
        futures = [client.publish("s", i) for i in range(3)]
        futures[1].cancel()
        await client.flush()
    assert [futures[0].result().seq, futures[2].result().seq] == [1, 3]
    assert len(bridge.stored["s"]) == 3


# -- flow control --------------------------------------------------------------------------


async def test_no_more_than_max_in_flight_requests_are_outstanding(bridge: FakeBridge) -> None:
    """With the bridge holding requests, exactly max_in_flight are in flight at once."""
    gate = asyncio.Event()
    bridge.default = FakeBridge.gated(gate)
    async with client_for(bridge, max_in_flight=2, batch_max_records=1) as client:
        futures = [client.publish("s", i) for i in range(6)]
        await bridge.until(lambda: bridge.in_flight == 2)
        assert len(bridge.requests) == 2
        gate.set()
        await settled(futures)
    assert bridge.peak_in_flight == 2
    assert len(bridge.requests) == 6


async def test_publish_raises_buffer_full_beyond_max_pending_records(bridge: FakeBridge) -> None:
    """Client memory is bounded: unconfirmed records beyond the cap are refused until acked."""
    async with client_for(bridge, max_pending_records=5) as client:
        futures = [client.publish("s", i) for i in range(5)]
        with pytest.raises(BufferFull, match="max_pending_records=5") as info:
            client.publish("s", 5)
        assert info.value.retry_after > 0
        await client.flush()
        extra = client.publish("s", 5)
        await client.flush()
        assert all(isinstance(ack, RecordAck) for ack in await settled([*futures, extra]))


# -- synchronous validation ----------------------------------------------------------------


@pytest.mark.parametrize("stream", ["", "a.b", "a*", "x" * 65, 7, None])
async def test_a_bad_stream_name_raises_invalid_input_synchronously(
    bridge: FakeBridge, stream: Any
) -> None:
    """The stream name is checked in publish itself; nothing is queued or sent."""
    async with client_for(bridge) as client:
        with pytest.raises(InvalidInput, match="invalid stream name"):
            client.publish(stream, b"x")
        assert client.stats.records_published == 0
    assert bridge.requests == []


async def test_bad_records_raise_synchronously_and_alone(bridge: FakeBridge) -> None:
    """A bad key, ts, payload type or size fails at publish; good records still go through."""
    async with client_for(bridge, max_record_bytes=10) as client:
        good = client.publish("s", b"ok")
        with pytest.raises(InvalidInput, match="key must be a str"):
            client.publish("s", b"x", key=7)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="ts must be"):
            client.publish("s", b"x", ts="yesterday")
        with pytest.raises(InvalidInput, match="JSON-encodable"):
            client.publish("s", object())
        with pytest.raises(RecordTooLarge, match="max_record_bytes=10"):
            client.publish("s", b"x" * 11)
        await client.flush()
    assert good.result().seq == 1
    assert record_counts(bridge) == [1]


def test_bad_settings_raise_value_error_naming_the_setting() -> None:
    """Out-of-range constructor arguments fail at construction, not at first send."""
    with pytest.raises(ValueError, match="batch_max_records"):
        EdgeClient(batch_max_records=0)
    with pytest.raises(ValueError, match="producer_id"):
        EdgeClient(producer_id="")
    with pytest.raises(ValueError, match="url"):
        EdgeClient("127.0.0.1:8787")


# -- lifecycle -----------------------------------------------------------------------------


async def test_close_flushes_and_publish_after_close_raises_closed_error(
    bridge: FakeBridge,
) -> None:
    """close delivers what is pending, is idempotent, and the client cannot be reused."""
    client = client_for(bridge)
    async with client:
        future = client.publish("s", 1)
    assert future.result().seq == 1
    await client.close()
    assert client.closed
    with pytest.raises(ClosedError):
        client.publish("s", 2)
    with pytest.raises(ClosedError):
        await client.__aenter__()


async def test_a_client_closed_without_publishing_sends_nothing(bridge: FakeBridge) -> None:
    """Opening and closing an unused client is clean and makes no request."""
    async with client_for(bridge) as client:
        pass
    assert client.closed
    assert bridge.requests == []


async def test_a_cancelled_close_aborts_and_fails_unconfirmed_records_with_closed_error(
    bridge: FakeBridge,
) -> None:
    """Cancelling close falls back to abort: no future is left pending, sockets are released."""
    bridge.default = FakeBridge.hang
    client = client_for(bridge)
    await client.__aenter__()
    future = client.publish("s", 1)
    closing = asyncio.create_task(client.close())
    await bridge.until(lambda: bridge.in_flight == 1)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    [outcome] = await settled([future])
    assert isinstance(outcome, ClosedError)
    assert "may or may not be stored" in str(outcome)
    await client.close()  # idempotent after an abort


# -- the synchronous client ----------------------------------------------------------------


def test_the_sync_client_publishes_from_many_threads_at_once(bridge: FakeBridge) -> None:
    """Four threads publish concurrently; every record is acked once with a distinct seq."""
    per_thread, threads = 500, 4
    results: list[list[RecordAck]] = []
    with SyncEdgeClient(
        transport=httpx.MockTransport(bridge.handle), batch_max_records=64, linger_ms=2.0
    ) as client:

        def produce(t: int) -> None:
            futures = [client.publish("s", {"t": t, "i": i}) for i in range(per_thread)]
            results.append([f.result(timeout=WAIT_S) for f in futures])

        workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(WAIT_S)
        assert client.stats.records_acked == per_thread * threads
    seqs = sorted(ack.seq for acks in results for ack in acks)
    assert seqs == list(range(1, per_thread * threads + 1))
    assert len(bridge.stored["s"]) == per_thread * threads


def test_the_sync_client_raises_in_the_calling_thread_and_closes_idempotently(
    bridge: FakeBridge,
) -> None:
    """Validation errors surface at publish; flush waits; publish after close is refused."""
    client = SyncEdgeClient(transport=httpx.MockTransport(bridge.handle), linger_ms=60_000.0)
    with pytest.raises(InvalidInput, match="invalid stream name"):
        client.publish("no.dots", b"x")
    future = client.publish("s", b"x")
    client.flush(timeout=WAIT_S)
    assert future.done() and future.result().seq == 1
    client.close(timeout=WAIT_S)
    client.close()
    with pytest.raises(ClosedError):
        client.publish("s", b"y")


def test_the_sync_client_close_timeout_fails_unconfirmed_records_and_returns(
    bridge: FakeBridge,
) -> None:
    """If the bridge does not answer within close's timeout, records fail with
    ClosedError (not_acknowledged) and close returns."""
    bridge.default = FakeBridge.hang
    client = SyncEdgeClient(transport=httpx.MockTransport(bridge.handle), linger_ms=0.0)
    future = client.publish("s", b"x")
    client.close(timeout=0.2)
    error = future.exception(timeout=WAIT_S)
    assert isinstance(error, ClosedError) and error.code == "not_acknowledged"


def test_the_sync_client_abort_fails_unconfirmed_records_at_once_and_close_reports_them(
    bridge: FakeBridge,
) -> None:
    """``abort`` does not wait for a silent bridge (close would, for close_timeout_s):
    it fails every unconfirmed record with ClosedError and returns without raising;
    the next ``close`` raises SendFailed for the ``send`` record, once."""
    bridge.default = FakeBridge.hang
    client = SyncEdgeClient(transport=httpx.MockTransport(bridge.handle), linger_ms=0.0,
                            close_timeout_s=600.0)
    future = client.publish("s", b"x")
    client.send("s", b"y")
    started = time.monotonic()
    client.abort()
    assert time.monotonic() - started < WAIT_S  # far below close_timeout_s
    error = future.exception(timeout=0)
    assert isinstance(error, ClosedError) and error.code == "shutting_down"
    assert "may or may not be stored" in str(error)
    assert client.closed
    with pytest.raises(ClosedError):
        client.publish("s", b"z")
    client.abort()  # idempotent
    with pytest.raises(SendFailed) as raised:
        client.close()
    assert raised.value.by_reason == {"shutting_down": 1}
    client.close()  # reported once
    assert client.stats.records_failed == 2


def test_the_sync_client_abort_ends_a_close_waiting_in_another_thread(
    bridge: FakeBridge,
) -> None:
    """A ``close`` waiting for a silent bridge returns as soon as another thread aborts,
    its records failed by the abort (not by the close timeout)."""
    bridge.default = FakeBridge.hang
    client = SyncEdgeClient(transport=httpx.MockTransport(bridge.handle), linger_ms=0.0,
                            close_timeout_s=600.0)
    future = client.publish("s", b"x")
    # A daemon: should abort fail, the test must not wait 600 s for the close at exit.
    closer = threading.Thread(target=client.close, name="closer", daemon=True)
    closer.start()
    deadline = time.monotonic() + WAIT_S
    while not client.closed:  # the close has begun
        assert time.monotonic() < deadline, "close never began"
        time.sleep(0.001)
    client.abort()
    closer.join(WAIT_S)
    assert not closer.is_alive()
    error = future.exception(timeout=0)
    assert isinstance(error, ClosedError) and error.code == "shutting_down"


async def test_flush_with_a_timeout_raises_timeout_error_and_sending_goes_on(
    bridge: FakeBridge,
) -> None:
    """flush(timeout) gives up waiting, not sending: the records stay pending."""
    bridge.default = FakeBridge.hang
    async with client_for(bridge, close_timeout_s=0.1) as client:
        future = client.publish("s", 1)
        with pytest.raises(TimeoutError, match="1 records not settled"):
            await client.flush(timeout=0.1)
        assert not future.done()


# -- public surface ------------------------------------------------------------------------


def test_the_package_exports_the_brokers_own_errors() -> None:
    """The errors the SDK exports are the broker's own classes, so one ``except`` catches
    them from any layer. (That ``__all__`` is exactly the public names:
    tests/unit/test_exports.py.)"""
    for name in ("BufferFull", "ClosedError", "InvalidInput", "RecordTooLarge", "TemporaryError"):
        assert getattr(edge_bridge.sdk, name) is getattr(errors, name)


async def test_publish_raises_buffer_full_beyond_max_pending_bytes(bridge: FakeBridge) -> None:
    """Large records are bounded by bytes, not only by count: with the bridge full
    (503), records of 100 kB stop being taken at max_pending_bytes, long before
    max_pending_records; the error names the bound; once the bridge takes them,
    publishing goes on."""
    bridge.default = FakeBridge.status(503, "buffer_full", "full", retry_after="0.05")
    payload = b"x" * 100_000
    async with client_for(bridge, max_pending_bytes=1_000_000, batch_max_records=1,
                          retry_timeout_s=30) as client:
        futures = []
        with pytest.raises(BufferFull, match="max_pending_bytes=1000000") as info:
            for _ in range(1_000):
                futures.append(client.publish("s", payload))
        assert 9 <= len(futures) <= 10
        assert info.value.retry_after > 0
        bridge.default = FakeBridge.store
        await client.flush()
        extra = client.publish("s", payload)
        await client.flush()
        assert all(isinstance(ack, RecordAck) for ack in await settled([*futures, extra]))
