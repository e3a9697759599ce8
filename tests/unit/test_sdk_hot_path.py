"""The SDK's per-record shortcuts keep the general rules: same bytes, same refusals, same futures.

``EdgeClient.publish`` encodes the common record (a dict, no headers, no ts,
a plain key) inline, the SDK holds records as tuples and writes the request
body itself, and the synchronous client's futures share one condition per
client. Each shortcut is checked here against the general path it stands for.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import msgspec
import pytest

from broker.errors import InvalidInput, RecordTooLarge
from broker.protocol.ingress import IngressRequest
from broker.protocol.validation import MAX_JSON_DEPTH
from broker.protocol.wire import CT_JSON, Record
from edge_bridge.sdk import EdgeClient, RecordAck
from edge_bridge.sdk._records import encode_request, prepare_record
from edge_bridge.sdk.sync_client import _RecordFuture

WAIT_S = 10.0


def test_the_request_body_is_byte_for_byte_the_ingress_request_the_bridge_decodes() -> None:
    """Tuples encode exactly as ``Record`` structs: the bridge's decoder reads them back."""
    records = [
        (1_700_000_000_000_000, CT_JSON, b'{"a":1}', "k", None),
        (5, 0, b"\x00raw", None, {"h": "v"}),
    ]
    body = encode_request("producer-1", 42, records)
    expected = IngressRequest("producer-1", 42, [Record(*r) for r in records])
    assert body == msgspec.msgpack.encode(expected)
    decoded = msgspec.msgpack.Decoder(IngressRequest).decode(body)
    assert decoded == expected


async def test_the_inline_path_refuses_what_the_general_path_refuses() -> None:
    """A dict with NUL text, nesting beyond the limit, an unencodable value or too many
    bytes fails at publish with the same errors as any other payload."""
    async with EdgeClient("http://127.0.0.1:9", max_record_bytes=64) as client:
        with pytest.raises(InvalidInput, match="u0000"):
            client.publish("s", {"text": "a\x00b"}, key="k")
        with pytest.raises(InvalidInput, match="JSON-encodable"):
            client.publish("s", {"when": object()}, key="k")
        with pytest.raises(RecordTooLarge, match="max_record_bytes=64"):
            client.publish("s", {"text": "x" * 100})
        with pytest.raises(InvalidInput, match="key"):
            client.publish("s", {"a": 1}, key="x" * 2000)
        await client.abort()
    deep: object = 1
    for _ in range(MAX_JSON_DEPTH + 1):
        deep = [deep]
    async with EdgeClient("http://127.0.0.1:9") as client:
        with pytest.raises(InvalidInput, match="nested"):
            client.publish("s", {"deep": deep})
        await client.abort()


def test_a_prepared_dict_record_is_json_with_its_key_and_a_current_timestamp() -> None:
    """The general path and the inline one produce the same record for a common dict."""
    before = time.time_ns() // 1000
    (ts, ct, data, key, headers), nbytes = prepare_record({"a": 1}, "k", None, None, 1024)
    assert (ct, data, key, headers) == (CT_JSON, b'{"a":1}', "k", None)
    assert before <= ts <= time.time_ns() // 1000
    assert nbytes == len(data) + len(key) + 16


def test_a_sync_record_future_has_every_attribute_a_plain_future_has() -> None:
    """The cheap constructor sets what ``Future.__init__`` sets, on this Python too."""
    shared = _RecordFuture(threading.Condition())
    assert set(vars(shared)) == set(vars(concurrent.futures.Future()))


def test_sync_record_futures_sharing_a_condition_wait_only_for_their_own_result() -> None:
    """Resolving one record wakes the waiters of the others, which keep waiting (and
    time out) instead of returning early; ``concurrent.futures.wait`` works on them."""
    condition = threading.Condition()
    first, second = _RecordFuture(condition), _RecordFuture(condition)
    outcome: list[object] = []

    def wait_second() -> None:
        try:
            outcome.append(second.result(timeout=0.5))
        except TimeoutError as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait_second)
    waiter.start()
    first.set_result(RecordAck("s", 1, 1))
    waiter.join(WAIT_S)
    assert len(outcome) == 1 and isinstance(outcome[0], TimeoutError)
    done, not_done = concurrent.futures.wait([first, second], timeout=0)
    assert done == {first} and not_done == {second}
    second.set_exception(InvalidInput("no"))
    assert isinstance(second.exception(timeout=WAIT_S), InvalidInput)
    assert first.result(timeout=0) == RecordAck("s", 1, 1)
    assert second.cancel() is False
    third = _RecordFuture(condition)
    assert third.cancel() is True
    with pytest.raises(concurrent.futures.CancelledError):
        third.result(timeout=WAIT_S)


def test_resolving_a_sync_batch_at_once_is_what_set_result_per_record_does() -> None:
    """Results, waiters of ``concurrent.futures.wait``, callbacks and a cancelled record
    end as they would with ``set_result`` on each future."""
    condition = threading.Condition()
    futures = [_RecordFuture(condition) for _ in range(3)]
    assert futures[1].cancel()
    called: list[RecordAck] = []
    futures[2].add_done_callback(lambda f: called.append(f.result()))
    waiting: list[set[concurrent.futures.Future[RecordAck]]] = []
    waiter = threading.Thread(target=lambda: waiting.append(
        concurrent.futures.wait([futures[0]], timeout=WAIT_S).done))
    waiter.start()
    _RecordFuture.resolve_all(futures, "s", 7, 10)
    waiter.join(WAIT_S)
    assert futures[0].result(timeout=0) == RecordAck("s", 7, 10)
    assert futures[1].cancelled()
    assert called == [RecordAck("s", 7, 12)]
    assert waiting == [{futures[0]}]
