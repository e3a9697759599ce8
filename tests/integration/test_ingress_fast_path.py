"""The records route's ASGI fast path answers exactly as the application's route: the
same status, body and headers for good input and for every kind of bad input; every
other request still reaches the application.

Each request goes to both: the application alone (``create_app``, the route as it
was served before the fast path) and what the bridge serves (``create_ingress``),
in process and on one running bridge, so they share its buffer and its producers.
"""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import msgspec
import pytest
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from broker.protocol.ingress import IngressRequest
from broker.protocol.wire import CT_JSON, CT_RAW, Record
from broker.runtime.embedded_nats import EmbeddedNats
from broker.settings import ProducerToken
from edge_bridge.bridge import Bridge
from edge_bridge.ingress import create_app, create_ingress
from edge_bridge.ingress_fast_path import RecordsFastPath
from edge_bridge.ingress_records import RecordsEndpoint
from tests.integration.harness import bridge_settings, running_bridge

TOKEN = "plc-token-Zt7Kq2Wm9Lx4Rb8Nc3Vy6Hd1"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MSGPACK = {"content-type": "application/msgpack", **AUTH}
JSON = {"content-type": "application/json", **AUTH}
MAX_REQUEST = 64 * 1024
MAX_RECORD = 4 * 1024
CAP = 96 * 1024  # small enough to fill; NATS is down, so nothing drains
Answer = tuple[int, list[tuple[str, str]], bytes]


def msgpack_body(n: int, *, request_seq: int, producer: str = "p-1", size: int = 20,
                 payload: bytes | None = None) -> bytes:
    records = [Record(1_700_000_000_000_000 + i, CT_JSON,
                      payload if payload is not None else b'"' + b"x" * size + b'"', f"k{i}")
               for i in range(n)]
    return msgspec.msgpack.encode(IngressRequest(producer, request_seq, records))


async def answer(http: httpx.AsyncClient, path: str, content: bytes | Callable[[], object],
                 headers: dict[str, str]) -> Answer:
    body = content() if callable(content) else content
    resp = await http.post(path, content=body, headers=headers)  # type: ignore[arg-type]
    return resp.status_code, list(resp.headers.multi_items()), resp.content


async def both(apps: tuple[httpx.AsyncClient, httpx.AsyncClient], path: str,
               content: bytes | Callable[[], object], headers: dict[str, str]
               ) -> tuple[Answer, Answer]:
    route, fast = apps
    return (await answer(route, path, content, headers),
            await answer(fast, path, content, headers))


async def chunks_past_the_limit() -> AsyncIterator[bytes]:
    for _ in range(8):
        yield b"x" * 16 * 1024


BAD_REQUESTS: list[tuple[str, str, bytes | Callable[[], object], dict[str, str], int]] = [
    ("a dot in the stream", "/v1/streams/bad.name/records", msgpack_body(1, request_seq=1),
     MSGPACK, 400),
    ("a stream of 65 characters", "/v1/streams/" + "s" * 65 + "/records",
     msgpack_body(1, request_seq=1), MSGPACK, 400),
    ("a space in the stream", "/v1/streams/a%20b/records", msgpack_body(1, request_seq=1),
     MSGPACK, 400),
    ("text/plain", "/v1/streams/s/records", b"hello", {"content-type": "text/plain", **AUTH},
     415),
    ("no content type", "/v1/streams/s/records", msgpack_body(1, request_seq=1), AUTH, 415),
    ("brotli", "/v1/streams/s/records", msgpack_body(1, request_seq=1),
     {**MSGPACK, "content-encoding": "br"}, 415),
    ("broken gzip", "/v1/streams/s/records", b"\x1f\x8b not gzip",
     {**MSGPACK, "content-encoding": "gzip"}, 400),
    ("a gzip bomb", "/v1/streams/s/records", gzip.compress(b" " * (MAX_REQUEST + 1)),
     {**JSON, "content-encoding": "gzip"}, 413),
    ("a declared length past the limit", "/v1/streams/s/records", b"x" * (MAX_REQUEST + 1),
     MSGPACK, 413),
    ("a chunked body past the limit", "/v1/streams/s/records", chunks_past_the_limit, MSGPACK,
     413),
    ("a record past its limit", "/v1/streams/s/records",
     msgpack_body(1, request_seq=1, size=MAX_RECORD + 1), MSGPACK, 413),
    ("no token", "/v1/streams/s/records", msgpack_body(1, request_seq=1),
     {"content-type": "application/msgpack"}, 401),
    ("an unknown token", "/v1/streams/s/records", msgpack_body(1, request_seq=1),
     {"content-type": "application/msgpack", "authorization": "Bearer nope"}, 401),
    ("another scheme", "/v1/streams/s/records", msgpack_body(1, request_seq=1),
     {"content-type": "application/msgpack", "authorization": f"Basic {TOKEN}"}, 401),
    ("a stream the token may not write", "/v1/streams/other/records",
     msgpack_body(1, request_seq=1), MSGPACK, 403),
    ("malformed MessagePack", "/v1/streams/s/records", b"\xc1\xc1\xc1", MSGPACK, 422),
    ("MessagePack of the wrong shape", "/v1/streams/s/records", msgspec.msgpack.encode([1, 2]),
     MSGPACK, 422),
    ("malformed JSON", "/v1/streams/s/records", b'{"records": [', JSON, 422),
    ("an unknown JSON field", "/v1/streams/s/records", b'{"records": [], "x": 1}', JSON, 422),
    ("no records", "/v1/streams/s/records", b'{"records": []}', JSON, 422),
    ("producer without request_seq", "/v1/streams/s/records",
     b'{"records": [{"payload": 1}], "producer": "p"}', JSON, 422),
    ("a bad ISO time", "/v1/streams/s/records", b'{"records": [{"payload": 1, "ts": "nope"}]}',
     JSON, 422),
    ("poison records", "/v1/streams/s/records",
     msgspec.msgpack.encode(IngressRequest("p-1", 1, [
         Record(0, CT_JSON, b"{"), Record(0, CT_RAW, b"ok"), Record(0, 7, b""),
         Record(0, CT_JSON, b'"\\u0000"'), Record(-(2**62), CT_RAW, b"")])),
     MSGPACK, 422),
    ("nesting beyond any decoder", "/v1/streams/s/records",
     b'{"records": [{"payload": ' + b"[" * 30_000 + b"]" * 30_000 + b"}]}",
     JSON, 422),
]


@pytest.fixture
async def bridge(tmp_path: Path, nats_server: EmbeddedNats) -> AsyncIterator[Bridge]:
    """A bridge with producer tokens, small limits and a small buffer that cannot drain."""
    await nats_server.stop()
    settings = bridge_settings(
        tmp_path, max_request_bytes=MAX_REQUEST, max_record_bytes=MAX_RECORD,
        buffer_max_bytes=CAP,
        producer_tokens=[ProducerToken(name="plc", token=TOKEN, streams=["s", "t-*"])])
    async with running_bridge(settings, nats_server.url) as running:
        yield running


@pytest.fixture
async def apps(bridge: Bridge) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Clients of the application's route alone and of what the bridge serves, in process."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(bridge)),
                                 base_url="http://bridge") as route, \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=create_ingress(bridge)),
                              base_url="http://bridge") as fast:
        yield route, fast


async def test_every_refusal_is_the_same_status_body_and_headers(
        bridge: Bridge, apps: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    """Bad stream names, content types and encodings, oversized bodies and records, bad
    tokens, malformed MessagePack and JSON, poison records: one bridge, every case."""
    for what, path, content, headers, status in BAD_REQUESTS:
        route, fast = await both(apps, path, content, headers)
        assert route[0] == status, (what, route)
        assert fast == route, what
        assert msgspec.json.decode(fast[2])["error"], what
    assert (await bridge.buffer.stats()).records == 0


async def test_a_good_request_is_answered_alike_and_a_retry_gets_the_same_bytes(
        bridge: Bridge, apps: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    """Fresh requests differ only in their seqs; a retry of one request gets the very
    same answer (the original acknowledgement) from either."""
    route, fast = apps
    first = await answer(route, "/v1/streams/s/records", msgpack_body(3, request_seq=1),
                         MSGPACK)
    second = await answer(fast, "/v1/streams/s/records", msgpack_body(3, request_seq=2),
                          MSGPACK)
    assert first[0] == second[0] == 200
    acks = msgspec.json.decode(first[2]), msgspec.json.decode(second[2])
    assert acks[1] == {**acks[0], "first_seq": acks[0]["first_seq"] + 3}
    assert [h for h in first[1] if h[0] != "content-length"] == [
        h for h in second[1] if h[0] != "content-length"]
    assert ("content-type", "application/json") in first[1]
    # Byte for byte what Starlette's JSONResponse renders (the ack is encoded without it).
    assert first[2] == JSONResponse(acks[0]).body and second[2] == JSONResponse(acks[1]).body
    retried = await both(apps, "/v1/streams/s/records", msgpack_body(3, request_seq=1),
                         MSGPACK)
    assert retried[0] == retried[1]
    assert msgspec.json.decode(retried[1][2]) == {**acks[0], "duplicate": True}
    as_json = (b'{"records": [{"payload": {"a": 1}, "key": "k", "ts": "2026-01-02T03:04:05Z"}'
               b'], "producer": "j", "request_seq": 1}')
    gzipped = {**JSON, "content-encoding": "gzip"}
    assert (await answer(fast, "/v1/streams/t-1/records", gzip.compress(as_json), gzipped)
            )[0] == 200
    json_retried = await both(apps, "/v1/streams/t-1/records", as_json, JSON)
    assert json_retried[0][0] == 200 and json_retried[1] == json_retried[0]
    assert (await bridge.buffer.stats()).records == 7


async def test_a_reused_request_seq_is_the_same_conflict(
        apps: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    route, _ = apps
    stored = await answer(route, "/v1/streams/s/records", msgpack_body(1, request_seq=5),
                          MSGPACK)
    assert stored[0] == 200
    conflict = await both(apps, "/v1/streams/s/records", msgpack_body(2, request_seq=5),
                          MSGPACK)
    assert conflict[0][0] == 409
    assert conflict[1] == conflict[0]


async def test_a_full_buffer_is_the_same_503_with_retry_after(
        bridge: Bridge, apps: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    _, fast = apps
    seq = 100
    while True:  # bounded: the buffer holds CAP bytes and each request adds ~2 KiB
        seq += 1
        status, _, _ = await answer(fast, "/v1/streams/s/records",
                                    msgpack_body(20, request_seq=seq, size=80), MSGPACK)
        if status != 200:
            break
        assert seq < 200, "the buffer never filled"
    full = await both(apps, "/v1/streams/s/records",
                      msgpack_body(20, request_seq=seq + 1, size=80), MSGPACK)
    assert full[0][0] == 503
    assert full[1] == full[0]
    assert msgspec.json.decode(full[1][2])["error"] == "buffer_full"
    assert int(dict(full[1][1])["retry-after"]) >= 1


async def test_the_served_ingress_answers_over_http_as_the_route_does(
        bridge: Bridge, apps: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    """Through uvicorn too (which adds its own date and server headers to both)."""
    route, _ = apps
    async with httpx.AsyncClient(base_url=bridge.url) as served:
        for content, headers in ((b"\xc1", MSGPACK), (msgpack_body(1, request_seq=1), AUTH),
                                 (b'{"records": []}', JSON)):
            over_http = await answer(served, "/v1/streams/s/records", content, headers)
            in_process = await answer(route, "/v1/streams/s/records", content, headers)
            assert over_http[0] == in_process[0] and over_http[2] == in_process[2]
            assert [h for h in over_http[1] if h[0] not in ("date", "server")] == in_process[1]
        ok = await served.post("/v1/streams/s/records", content=msgpack_body(2, request_seq=9),
                               headers=MSGPACK)
        assert ok.status_code == 200 and ok.json()["count"] == 2
        assert (await served.get("/openapi.json")).json()["paths"][
            "/v1/streams/{stream}/records"]["post"]["requestBody"]


async def test_only_the_records_route_is_taken_off_the_application(bridge: Bridge) -> None:
    """Other paths, methods and shapes of path reach the application unchanged
    (404, 405, its redirect); the records route never does."""
    reached: list[tuple[str, str]] = []
    app = create_app(bridge)

    async def spy(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append((scope["method"], scope["path"]))
        await app(scope, receive, send)

    fast = RecordsFastPath(spy, RecordsEndpoint(bridge))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fast),
                                 base_url="http://bridge") as http, \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                              base_url="http://bridge") as plain:
        assert (await http.post("/v1/streams/s/records", content=b"\xc1",
                                headers=MSGPACK)).status_code == 422
        assert reached == []
        for method, path in (("GET", "/v1/streams/s/records"), ("POST", "/v1/streams//records"),
                             ("POST", "/v1/streams/a/b/records"), ("POST", "/v1/streams/records"),
                             ("POST", "/v1/streams/s/records/"), ("GET", "/healthz"),
                             ("GET", "/openapi.json"), ("PUT", "/v1/streams/s/records")):
            got = await http.request(method, path, content=b"{}", headers=JSON)
            want = await plain.request(method, path, content=b"{}", headers=JSON)
            assert (got.status_code, got.headers.multi_items(), got.content) == (
                want.status_code, want.headers.multi_items(), want.content), (method, path)
            assert reached[-1] == (method, path)
