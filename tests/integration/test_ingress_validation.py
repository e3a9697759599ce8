"""The ingress refuses up front, with the cloud's own validator, what the cloud could
not store: 4xx with a JSON body naming each bad record, and nothing of the request
stored (issue 10, section 1 and "Also")."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from broker.pg_connecting import connected
from broker.protocol.ingress import IngressRequest
from broker.protocol.wire import CT_JSON, Record
from broker.runtime.embedded_nats import EmbeddedNats
from tests.integration.harness import (
    bridge_settings,
    running_bridge,
    running_ingest,
    wait_for_records,
)

MSGPACK = {"content-type": "application/msgpack"}
TS = 1_700_000_000_000_000


def msgpack_body(records: list[Any], *, producer: str = "p", request_seq: int = 0) -> bytes:
    return msgspec.msgpack.encode(
        {"producer": producer, "request_seq": request_seq, "records": records})


JSON_POISON: dict[str, dict[str, Any]] = {
    "ts -9223000000000 s (the issue's curl)": {"payload": 1, "ts": -9_223_000_000_000},
    "ts 1e13 s": {"payload": 1, "ts": 1e13},
    "ts 1e300 s": {"payload": 1, "ts": 1e300},
    "JSON text with \\u0000": {"payload": {"a": "x\u0000y"}},
    "JSON nested 1000 deep": {"payload": [[[[[]]]]]},  # replaced below: json= cannot nest
    "JSON number 1e-99999": {"payload": 0.0},  # replaced below: json= cannot spell it
    "key with NUL": {"payload": 1, "key": "k\u0000"},
    "header with NUL": {"payload": 1, "headers": {"h": "\u0000"}},
}
MSGPACK_POISON: dict[str, list[Any]] = {
    "ts -2^63": [-(2**63), CT_JSON, b"1"],
    "ts 2^64-1": [2**64 - 1, CT_JSON, b"1"],
    "JSON with \\u0000": [TS, CT_JSON, b'"\\u0000"'],
    "not JSON": [TS, CT_JSON, b"{"],
    "JSON number beyond numeric": [TS, CT_JSON, b"[1e-99999]"],  # 0.0 to a float parse
}


async def test_each_poison_record_is_refused_with_its_index_and_nothing_is_stored(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    """A request of good records with one poison record among them: 422 naming that
    record's index and why; the buffer stays empty; the good records alone then pass."""
    async with (
        running_bridge(bridge_settings(tmp_path), nats_server.url) as bridge,
        httpx.AsyncClient(base_url=bridge.url) as http,
    ):
        for name, bad in JSON_POISON.items():
            if "1000 deep" in name or "1e-99999" in name:
                payload = (b"[" * 1000 + b"]" * 1000 if "1000 deep" in name
                           else b"1e-99999")
                content = b'{"records": [{"payload": 1}, {"payload": ' + payload + b"}]}"
                resp = await http.post("/v1/streams/s/records", content=content,
                                       headers={"content-type": "application/json"})
            else:
                resp = await http.post("/v1/streams/s/records",
                                       json={"records": [{"payload": 1}, bad]})
            assert 400 <= resp.status_code < 500, (name, resp.status_code, resp.text)
            body = resp.json()
            assert body["error"] in ("invalid_records", "malformed_body"), (name, body)
            assert body["message"], name
            if body["error"] == "invalid_records" and "records" in body:
                assert [r["index"] for r in body["records"]] == [1], (name, body)
        for name, raw in MSGPACK_POISON.items():
            resp = await http.post("/v1/streams/s/records", headers=MSGPACK,
                                   content=msgpack_body([[TS, CT_JSON, b"1"], raw]))
            assert resp.status_code == 422, (name, resp.text)
            assert resp.json()["records"] == [{"index": 1, "reason": resp.json()["records"][0]
                                               ["reason"]}], name
        float_ts = await http.post("/v1/streams/s/records", headers=MSGPACK,
                                   content=msgpack_body([[1.7e15, CT_JSON, b"1"]]))
        assert float_ts.status_code == 422 and "int" in float_ts.json()["message"]
        huge_seq = await http.post("/v1/streams/s/records", json={
            "producer": "p", "request_seq": 2**63, "records": [{"payload": 1}]})
        assert huge_seq.status_code == 422, huge_seq.text
        assert (await bridge.buffer.stats()).records == 0
        several = await http.post("/v1/streams/s/records", headers=MSGPACK, content=msgpack_body(
            [[TS, CT_JSON, b"1"], [TS, CT_JSON, b"{"], [TS, CT_JSON, b"2"],
             [-(2**63), CT_JSON, b"3"]]))
        assert [r["index"] for r in several.json()["records"]] == [1, 3]
        ok = await http.post("/v1/streams/s/records", json={"records": [{"payload": 1}]})
        assert ok.status_code == 200 and ok.json()["first_seq"] == 1


async def test_gzip_bodies_are_accepted_and_other_encodings_refused(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    """Content-Encoding gzip is decoded; an unknown encoding is 415 and a broken gzip
    body 400, each with a message."""
    plain = msgspec.msgpack.encode(IngressRequest("p", 1, [Record(TS, CT_JSON, b"1")]))
    async with (
        running_bridge(bridge_settings(tmp_path), nats_server.url) as bridge,
        httpx.AsyncClient(base_url=bridge.url) as http,
    ):
        ok = await http.post("/v1/streams/s/records", content=gzip.compress(plain),
                             headers={**MSGPACK, "content-encoding": "gzip"})
        br = await http.post("/v1/streams/s/records", content=plain,
                             headers={**MSGPACK, "content-encoding": "br"})
        broken = await http.post("/v1/streams/s/records", content=b"\x1f\x8bnot gzip",
                                 headers={**MSGPACK, "content-encoding": "gzip"})
    assert ok.status_code == 200, ok.text
    assert (br.status_code, br.json()["error"]) == (415, "unsupported_content_encoding")
    assert (broken.status_code, broken.json()["error"]) == (400, "invalid_content_encoding")


async def test_a_request_seq_reused_for_another_request_is_409_and_epoch_has_a_string_form(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    """A retry gets its original answer; the same (producer, request_seq) for a
    different request is refused with 409. Answers carry the epoch as a string too."""
    async with (
        running_bridge(bridge_settings(tmp_path), nats_server.url) as bridge,
        httpx.AsyncClient(base_url=bridge.url) as http,
    ):
        one = msgspec.msgpack.encode(IngressRequest("p", 5, [Record(TS, CT_JSON, b"1")]))
        two = msgspec.msgpack.encode(IngressRequest("p", 5, [Record(TS, CT_JSON, b"1")] * 2))
        first = await http.post("/v1/streams/s/records", content=one, headers=MSGPACK)
        retry = await http.post("/v1/streams/s/records", content=one, headers=MSGPACK)
        reused = await http.post("/v1/streams/s/records", content=two, headers=MSGPACK)
        other_stream = await http.post("/v1/streams/t/records", content=one, headers=MSGPACK)
    assert first.json()["epoch_str"] == str(first.json()["epoch"])
    assert retry.json()["duplicate"] is True
    assert (reused.status_code, reused.json()["error"]) == (409, "request_seq_reused")
    assert other_stream.status_code == 409


async def test_openapi_describes_the_request_bodies_and_every_answer(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    """/openapi.json states both request bodies and every status the route answers,
    errors with the {"error", "message"} shape."""
    async with (
        running_bridge(bridge_settings(tmp_path), nats_server.url) as bridge,
        httpx.AsyncClient(base_url=bridge.url) as http,
    ):
        spec = (await http.get("/openapi.json")).json()
    op = spec["paths"]["/v1/streams/{stream}/records"]["post"]
    assert set(op["requestBody"]["content"]) == {"application/msgpack", "application/json"}
    assert {"200", "400", "409", "413", "415", "422", "503"} <= set(op["responses"])
    for status in ("400", "409", "413", "415", "422", "503"):
        schema = op["responses"][status]["content"]["application/json"]["schema"]
        assert schema["required"] == ["error", "message"], status


async def test_every_route_is_described_and_every_refusal_is_json(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    """/openapi.json lists exactly the routes the bridge answers, each answering a
    status it lists; an unknown path (404) and a wrong method (405, with Allow) answer
    {"error", "message"} like every other refusal."""
    async with (
        running_bridge(bridge_settings(tmp_path), nats_server.url) as bridge,
        httpx.AsyncClient(base_url=bridge.url) as http,
    ):
        spec = (await http.get("/openapi.json")).json()
        assert spec["openapi"].startswith("3.1") and spec["info"]["version"]
        for path, operations in spec["paths"].items():
            if "{" in path:
                continue
            for method, operation in operations.items():
                answer = await http.request(method, path)
                assert str(answer.status_code) in operation["responses"], (method, path)
        assert set(spec["paths"]) == {"/v1/streams/{stream}/records", "/healthz", "/readyz",
                                      "/metrics", "/openapi.json"}
        missing = await http.get("/v1/nothing-here")
        wrong = await http.delete("/healthz")
        docs = await http.get("/docs")
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    assert (wrong.status_code, wrong.json()["error"]) == (405, "method_not_allowed")
    assert "GET" in wrong.headers["allow"]
    assert docs.status_code == 404 and docs.json()["message"]


@pytest.mark.chaos_ci
async def test_poison_from_one_producer_never_blocks_the_others_on_the_same_stream(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """One producer keeps sending requests with poison records while two others write
    to the same stream: every poison request is refused (422), every acknowledged
    record commits, and the stream's watermark reaches its last seq."""
    acked: list[tuple[int, int]] = []
    async with (
        running_ingest(pg_dsn, nats_server.url),
        running_bridge(bridge_settings(tmp_path), nats_server.url) as bridge,
        httpx.AsyncClient(base_url=bridge.url) as http,
    ):
        for i in range(30):
            poison = await http.post("/v1/streams/shared/records", headers=MSGPACK,
                                     content=msgpack_body(
                                         [[TS, CT_JSON, b"1"], [-(2**63), CT_JSON, b"1"]],
                                         producer="bad", request_seq=i))
            assert poison.status_code == 422
            for producer in ("good-1", "good-2"):
                resp = await http.post("/v1/streams/shared/records", headers=MSGPACK,
                                       content=msgpack_body([[TS + i, CT_JSON, b"2"]] * 10,
                                                            producer=producer, request_seq=i))
                assert resp.status_code == 200
                acked.append((resp.json()["first_seq"], resp.json()["count"]))
        total = sum(n for _, n in acked)
        await wait_for_records(pg_dsn, total)
    async with connected(pg_dsn) as conn:
        row = await conn.fetchrow("SELECT watermark, missing_records, dead_lettered_records "
                                  "FROM v_completeness WHERE stream = 'shared'")
    assert tuple(row) == (total, 0, 0)


async def test_a_stream_past_the_bridges_limit_is_refused_and_the_known_ones_go_on(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    """Each stream costs every write, shipper round and heartbeat (whose per-stream
    health must fit one NATS message), so a producer minting
    stream names without end meets ``max_streams``: 422 ``too_many_streams`` for a new
    name, nothing of it stored, and the streams the bridge has keep taking records, also
    after a restart."""
    settings = bridge_settings(tmp_path, max_streams=3)
    one = {"records": [{"payload": 1}]}
    for round_ in range(2):  # the second time on a restarted bridge: the limit holds
        async with (
            running_bridge(settings, nats_server.url) as bridge,
            httpx.AsyncClient(base_url=bridge.url) as http,
        ):
            for stream in ("a", "b", "c"):
                ok = await http.post(f"/v1/streams/{stream}/records", json=one)
                assert ok.status_code == 200, ok.text
            stored = (await bridge.buffer.stats()).records
            for new in ("d", f"e{round_}"):
                refused = await http.post(f"/v1/streams/{new}/records", json=one)
                assert (refused.status_code, refused.json()["error"]) == (
                    422, "too_many_streams"), refused.text
                assert "bridge.max_streams" in refused.json()["message"]
            msgpack = await http.post("/v1/streams/f/records", headers=MSGPACK,
                                      content=msgpack_body([[TS, CT_JSON, b"1"]]))
            assert msgpack.status_code == 422, msgpack.text
            assert (await bridge.buffer.stats()).records == stored
