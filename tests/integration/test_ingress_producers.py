"""Producers at the bridge ingress: loopback by default; with producer tokens every
publish needs one (401) and may write only its streams (403), decided from the
headers before the body is read; an exposed ingress without tokens does not start."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from broker.errors import ConfigError
from broker.runtime.embedded_nats import EmbeddedNats
from broker.settings import BridgeSettings, NatsSettings, ProducerToken
from edge_bridge.bridge import Bridge
from edge_bridge.producers import ProducerGate
from edge_bridge.sdk import EdgeClient
from tests.integration.harness import bridge_settings, running_bridge

PLC = "plc-token-Zt7Kq2Wm9Lx4Rb8Nc3Vy6Hd1"
CAMERA = "camera-token-Gh5Jp8Qs2Xv7Mb4Tk9Lw3"
JSON = {"content-type": "application/json"}
ONE = {"records": [{"payload": {"t": 21.5}}]}


def test_the_ingress_binds_loopback_by_default() -> None:
    assert BridgeSettings().host == "127.0.0.1"


@pytest.mark.parametrize("overrides, message", [
    ({"host": "0.0.0.0"}, "no producer tokens are configured"),
    ({"producer_tokens": [ProducerToken(name="weak", token="changeme")]}, "too weak"),
    ({"producer_tokens": [ProducerToken(name="a", token=PLC),
                          ProducerToken(name="a", token=CAMERA)]}, "duplicate names"),
])
def test_an_exposed_ingress_without_tokens_or_a_weak_token_is_a_config_error(
        overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ProducerGate.from_settings(BridgeSettings(**overrides))  # type: ignore[arg-type]
    ProducerGate.from_settings(BridgeSettings(host="0.0.0.0", allow_anonymous_producers=True))


async def test_tokens_are_required_and_confine_producers_to_their_streams(
        tmp_path: Path, nats_server: EmbeddedNats) -> None:
    tokens_file = tmp_path / "producers.json"
    tokens_file.write_text(json.dumps([{"name": "camera", "token": CAMERA,
                                        "streams": ["video-*"]}]))
    settings = bridge_settings(
        tmp_path, producer_tokens=[ProducerToken(name="plc", token=PLC, streams=["telemetry"])],
        producer_tokens_file=tokens_file)
    async with running_bridge(settings, nats_server.url) as bridge, \
            httpx.AsyncClient(base_url=bridge.url) as http:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {PLC}"}):
            refused = await http.post("/v1/streams/telemetry/records", json=ONE,
                                      headers=headers)
            assert refused.status_code == 401, refused.text
            assert refused.json()["error"] == "unauthorized"
            assert refused.headers["www-authenticate"].startswith("Bearer")
        # 401 comes from the headers: a body that would not even parse is not looked at.
        garbage = await http.post("/v1/streams/telemetry/records", content=b"\xff" * 100,
                                  headers=JSON)
        assert garbage.status_code == 401
        plc = {"Authorization": f"Bearer {PLC}"}
        camera = {"Authorization": f"Bearer {CAMERA}"}
        assert (await http.post("/v1/streams/telemetry/records", json=ONE,
                                headers=plc)).status_code == 200
        other = await http.post("/v1/streams/video-1/records", json=ONE, headers=plc)
        assert other.status_code == 403 and other.json()["error"] == "forbidden"
        assert "telemetry" in other.json()["message"]
        assert (await http.post("/v1/streams/video-1/records", json=ONE,
                                headers=camera)).status_code == 200
        assert (await http.post("/v1/streams/telemetry/records", json=ONE,
                                headers=camera)).status_code == 403
        assert (await http.get("/healthz")).status_code == 200
        async with EdgeClient(bridge.url, token=PLC) as client:  # the SDK sends it too
            await client.publish_wait("telemetry", {"t": 1})
        stored = await bridge.buffer.stats()
        assert stored.records == 3, stored


async def test_a_chunked_body_past_the_limit_is_refused_while_streaming(
        tmp_path: Path, nats_server: EmbeddedNats) -> None:
    """No Content-Length to go by: the read stops at the limit with a 413."""
    settings = bridge_settings(tmp_path, max_request_bytes=64 * 1024)

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(64):
            yield b"x" * 16 * 1024

    async with running_bridge(settings, nats_server.url) as bridge, \
            httpx.AsyncClient(base_url=bridge.url) as http:
        response = await http.post("/v1/streams/s/records", content=chunks(), headers=JSON)
        assert response.status_code == 413 and response.json()["error"] == "request_too_large"


async def test_a_bridge_exposed_without_tokens_does_not_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="allow_anonymous_producers"):
        async with Bridge(bridge_settings(tmp_path, host="0.0.0.0"), NatsSettings()):
            pass
