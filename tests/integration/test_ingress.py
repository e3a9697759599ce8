"""The bridge's HTTP ingress: durable answers, de-duplicated retries, clear refusals."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest

from broker.pg_connecting import connected
from broker.protocol.ingress import IngressRequest
from broker.protocol.wire import CT_JSON, Record
from broker.runtime.embedded_nats import EmbeddedNats
from edge_bridge.bridge import Bridge
from tests.integration.harness import (
    bridge_settings,
    count_records,
    running_bridge,
    running_ingest,
    wait_for_records,
)


def body(n: int, *, producer: str = "p-1", request_seq: int = 0, size: int = 20) -> bytes:
    records = [
        Record(1_700_000_000_000_000 + i, CT_JSON, b'"' + b"x" * size + b'"', f"k{i}")
        for i in range(n)
    ]
    return msgspec.msgpack.encode(IngressRequest(producer, request_seq, records))


MSGPACK = {"content-type": "application/msgpack"}


@contextlib.asynccontextmanager
async def ingress(tmp: Path, nats_url: str, dsn: str | None = None
                  ) -> AsyncIterator[tuple[Bridge, httpx.AsyncClient]]:
    """A running bridge and an HTTP client on its ingress; with ``dsn``, an ingest too."""
    async with contextlib.AsyncExitStack() as stack:
        if dsn is not None:
            await stack.enter_async_context(running_ingest(dsn, nats_url))
        bridge = await stack.enter_async_context(running_bridge(bridge_settings(tmp), nats_url))
        yield bridge, await stack.enter_async_context(httpx.AsyncClient(base_url=bridge.url))


async def test_a_retried_request_after_a_lost_response_is_stored_once(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """The same (producer, request_seq) sent twice: one set of rows in Postgres."""
    async with ingress(tmp_path, nats_server.url, pg_dsn) as (_, http):
        payload = body(50, request_seq=1)
        first = await http.post("/v1/streams/s/records", content=payload, headers=MSGPACK)
        # The client never saw `first` (its response was lost) and sends it again.
        retry = await http.post("/v1/streams/s/records", content=payload, headers=MSGPACK)
        after = await http.post(
            "/v1/streams/s/records", content=body(1, request_seq=2), headers=MSGPACK
        )
        assert first.status_code == retry.status_code == 200
        assert retry.json() == {**first.json(), "duplicate": True}
        assert after.json()["first_seq"] == 51
        await wait_for_records(pg_dsn, 51)
        assert await count_records(pg_dsn, "key = 'k0'") == 2  # one per request, not three


async def test_json_requests_work_for_curl_users(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """JSON bodies: JSON payloads become jsonb, base64 payloads stay raw bytes."""
    async with ingress(tmp_path, nats_server.url, pg_dsn) as (_, http):
        resp = await http.post(
            "/v1/streams/s/records",
            json={
                "records": [
                    {"payload": {"t": 21.5}, "key": "a", "ts": "2026-01-02T03:04:05.5Z"},
                    {"payload_b64": "AAEC/w==", "ts": 1_700_000_000.25, "headers": {"h": "v"}},
                ]
            },
        )
        assert resp.status_code == 200, resp.text
        await wait_for_records(pg_dsn, 2)
    async with connected(pg_dsn) as conn:
        rows = await conn.fetch(
            "SELECT seq, event_time, key, headers::jsonb AS headers, "
            "payload::jsonb::text AS p, payload_raw FROM records ORDER BY seq"
        )
    assert rows[0]["p"] == '{"t": 21.5}' and rows[0]["key"] == "a"
    assert rows[0]["event_time"].isoformat() == "2026-01-02T03:04:05.500000+00:00"
    assert rows[1]["payload_raw"] == b"\x00\x01\x02\xff"
    assert rows[1]["event_time"].timestamp() == 1_700_000_000.25
    assert rows[1]["headers"] == '{"h": "v"}'


@pytest.mark.parametrize(
    ("path", "content", "headers", "status", "code"),
    [
        ("/v1/streams/bad.name/records", body(1), MSGPACK, 400, "invalid_stream"),
        ("/v1/streams/x%2A/records", body(1), MSGPACK, 400, "invalid_stream"),
        ("/v1/streams/s/records", body(1, size=2_000_000), MSGPACK, 413, "record_too_large"),
        ("/v1/streams/s/records", b"\xc1garbage", MSGPACK, 422, "malformed_body"),
        (
            "/v1/streams/s/records",
            msgspec.msgpack.encode({"records": []}),
            MSGPACK,
            422,
            "malformed_body",
        ),
        (
            "/v1/streams/s/records",
            b'{"records": [{"key": "no payload"}]}',
            {"content-type": "application/json"},
            422,
            "invalid_records",
        ),
        (
            "/v1/streams/s/records",
            b'{"records": [',
            {"content-type": "application/json"},
            422,
            "malformed_body",
        ),
        (
            "/v1/streams/s/records",
            b"hello",
            {"content-type": "text/plain"},
            415,
            "unsupported_media_type",
        ),
    ],
)
async def test_bad_requests_get_a_4xx_with_a_json_message(
    tmp_path: Path,
    nats_server: EmbeddedNats,
    path: str,
    content: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    """Bad stream names, oversize records and malformed bodies are refused clearly."""
    async with ingress(tmp_path, nats_server.url) as (bridge, http):
        resp = await http.post(path, content=content, headers=headers)
        assert resp.status_code == status, resp.text
        assert resp.json()["error"] == code
        assert resp.json()["message"]
        stats = await bridge.buffer.stats()
        assert stats.records == 0


async def test_health_and_metrics_endpoints(tmp_path: Path, nats_server: EmbeddedNats) -> None:
    async with ingress(tmp_path, nats_server.url) as (_, http):
        await http.post("/v1/streams/s/records", content=body(3), headers=MSGPACK)
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        assert (await http.get("/readyz")).status_code == 200
        metrics = (await http.get("/metrics")).text
        assert 'edgesync_records_accepted_total{stream="s"} 3.0' in metrics
        assert "edgesync_buffer_bytes" in metrics
