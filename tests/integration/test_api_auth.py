"""The operator API's gate: every request but the probes needs an operator token,
scopes decide what it may do, every write lands in an append-only audit log, and a
body above the limit is refused before it is read or anyone is authenticated."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from broker.errors import ConfigError
from broker.pg_connecting import connected
from broker.runtime.embedded_nats import EmbeddedNats
from broker.settings import ApiSettings, NatsSettings
from cloud_ingest.api import Api
from cloud_ingest.operators import add_operator
from tests.integration.control_harness import ControlPlane, control_plane, run_cli
from tests.integration.harness import bridge_settings, running_bridge

SCALE = {"kind": "deployment.scale", "spec": {"namespace": "prod", "name": "web", "replicas": 2}}
CONFIGURE = {"kind": "bridge.configure", "spec": {"linger_ms": 5}}
METRICS_TOKEN = "metrics-scraper-8Jk2Lm9Qx4Vr7Tz1Nc5Wb3Hy6"


@pytest.fixture
async def plane(tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
                ) -> AsyncIterator[ControlPlane]:
    async with (
        control_plane(tmp_path, nats_server.url, pg_dsn, metrics_token=METRICS_TOKEN) as plane,
        running_bridge(bridge_settings(tmp_path, heartbeat_interval_s=0.1), nats_server.url),
    ):
        await plane.wait_edge("edge-1")
        yield plane


async def operator(plane: ControlPlane, name: str, *scopes: str) -> httpx.AsyncClient:
    """A client holding a new operator's token (made the way the CLI makes them)."""
    async with connected(plane.pg_dsn) as conn:
        token = await add_operator(conn, name, scopes, created_by="test")
    return httpx.AsyncClient(base_url=plane.api.url, timeout=10,
                             headers={"Authorization": f"Bearer {token}"})


async def test_every_route_but_the_probes_needs_a_token(plane: ControlPlane) -> None:
    """Reads included; an empty bearer or a wrong scheme is no token; probes stay open."""
    async with httpx.AsyncClient(base_url=plane.api.url) as anonymous:
        for path in ("/v1/edges", "/v1/edges/edge-1/commands", "/metrics", "/v1/audit",
                     "/v1/commands/00000000-0000-4000-8000-000000000000",
                     "/v1/dead-letters", "/v1/operators"):
            for headers in ({}, {"Authorization": "Bearer"},
                            {"Authorization": f"Basic {plane.token}"},
                            {"Authorization": "Bearer eso_not-a-real-token"}):
                response = await anonymous.get(path, headers=headers)
                assert response.status_code == 401, (path, headers, response.text)
                assert response.json()["error"] == "unauthorized"
                assert response.headers["www-authenticate"].startswith("Bearer")
        # An anonymous write with a body that does not even parse: 401, not 422.
        response = await anonymous.post("/v1/edges/edge-1/commands", content=b"\xff{not json")
        assert response.status_code == 401
        assert (await anonymous.get("/healthz")).status_code == 200
        assert (await anonymous.get("/readyz")).status_code == 200
        scraped = await anonymous.get("/metrics",
                                      headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert scraped.status_code == 200 and "edgesync_api_requests" in scraped.text
        # The metrics token opens /metrics only.
        other = await anonymous.get("/v1/edges",
                                    headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert other.status_code == 401


async def test_scopes_decide_reads_commands_per_kind_and_administration(
        plane: ControlPlane) -> None:
    """read reads; operate:<kind> sends that kind only; operate sends all; admin sees
    the audit log. Refusals are 403 with the scope named, and nothing is stored."""
    reader = await operator(plane, "rita", "read")
    scaler = await operator(plane, "sam", "operate:deployment.scale")
    ops = await operator(plane, "olga", "operate")
    try:
        assert (await reader.get("/v1/edges")).status_code == 200
        refused = await reader.post("/v1/edges/edge-1/commands", json=SCALE)
        assert refused.status_code == 403 and refused.json()["error"] == "forbidden", refused.text
        assert "operate:deployment.scale" in refused.json()["message"]
        assert (await scaler.get("/v1/edges")).status_code == 200  # operate:* implies read
        sent = await scaler.post("/v1/edges/edge-1/commands", json=SCALE)
        assert sent.status_code == 202, sent.text
        assert (await scaler.post("/v1/edges/edge-1/commands",
                                  json=CONFIGURE)).status_code == 403
        assert (await ops.post("/v1/edges/edge-1/commands", json=CONFIGURE)).status_code == 202
        for client in (reader, scaler, ops):
            assert (await client.get("/v1/audit")).status_code == 403
            assert (await client.get("/v1/operators")).status_code == 403
        command = await plane.command(sent.json()["id"])
        assert command["issuer"] == "sam@edgesync-api"  # signed into the envelope too
        listed = (await plane.http.get("/v1/edges/edge-1/commands")).json()
        assert sorted(c["kind"] for c in listed) == ["bridge.configure", "deployment.scale"]
        names = [o["name"] for o in (await plane.http.get("/v1/operators")).json()]
        assert names == ["olga", "rita", "sam"]
    finally:
        for client in (reader, scaler, ops):
            await client.aclose()


async def test_the_audit_log_records_who_what_when_and_from_where_and_is_append_only(
        plane: ControlPlane) -> None:
    reader = await operator(plane, "rita", "read")
    try:
        before = time.time()
        accepted = (await plane.http.post(  # the client is the peer, whatever it says
            "/v1/edges/edge-1/commands", json=SCALE,
            headers={"X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6"})).json()
        await reader.post("/v1/edges/edge-1/commands", json=SCALE)  # 403: audited too
        await reader.get("/v1/edges")  # reads are not audited
        rows = (await plane.http.get("/v1/audit")).json()
    finally:
        await reader.aclose()
    denied, issued, added = rows[0], rows[1], rows[2]
    assert issued["operator"] == "bootstrap" and issued["action"] == "command.issue"
    assert issued["target"] == "edge-1" and issued["status"] == 202
    assert issued["detail"]["command"] == accepted["id"]
    assert issued["detail"]["kind"] == "deployment.scale"
    assert issued["client"].startswith("127.0.0.1:")
    assert datetime.fromisoformat(issued["at"]).timestamp() >= before - 1
    assert denied["operator"] == "rita" and denied["status"] == 403
    assert added["action"] == "operator.add" and added["target"] == "rita"
    async with connected(plane.pg_dsn) as conn:
        for statement in ("UPDATE audit_log SET operator = 'nobody'", "DELETE FROM audit_log",
                          "TRUNCATE audit_log"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(statement)


async def test_a_revoked_operator_is_refused_from_the_next_request(plane: ControlPlane) -> None:
    client = await operator(plane, "leaver", "read")
    try:
        assert (await client.get("/v1/edges")).status_code == 200
        result = await run_cli("operators", "revoke", "leaver", "--dsn", plane.pg_dsn)
        assert result.exit_code == 0, result.stderr
        assert (await client.get("/v1/edges")).status_code == 401
    finally:
        await client.aclose()


async def test_a_token_already_an_operators_is_refused_with_the_reason(
        plane: ControlPlane) -> None:
    """A brought token is one operator's for good (revoked ones included): a second
    operator with it is refused as such (it was "cannot reach the database")."""
    token = "bring-your-own-" + "k" * 40
    for name, code in (("first", 0), ("second", 1)):
        result = await run_cli("operators", "add", name, "--scope", "read",
                               "--token-stdin", "--dsn", plane.pg_dsn, stdin=f"{token}\n")
        assert result.exit_code == code, result
    assert "that token is (or was) another operator's" in result.stderr
    assert "cannot reach" not in result.stderr


async def test_bodies_above_the_limit_are_refused_before_reading_or_authentication(
        plane: ControlPlane) -> None:
    """A declared 40 MiB body is 413 at once, token or not; a chunked body is cut off at
    the limit; the server's memory never holds more than the limit."""
    async with httpx.AsyncClient(base_url=plane.api.url, timeout=10) as anonymous:
        started = time.monotonic()
        huge = b"x" * (40 * 1024**2)
        response = await anonymous.post("/v1/edges/edge-1/commands", content=huge)
        assert response.status_code == 413, response.text
        assert response.json()["error"] == "request_too_large"
        assert time.monotonic() - started < 10

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"y" * 64 * 1024  # 4 MiB, no Content-Length
            await asyncio.sleep(0)

    response = await plane.http.post("/v1/edges/edge-1/commands", content=chunks())
    assert response.status_code == 413 and response.json()["error"] == "request_too_large"


async def test_malformed_bodies_and_loose_types_get_the_documented_refusal(
        plane: ControlPlane) -> None:
    """Not UTF-8, not JSON, a string or a bool where a number goes, a TTL under the
    minimum: 4xx with {"error", "message"}, never {"detail": ...} alone, never coerced."""
    scale_spec: dict[str, Any] = SCALE["spec"]  # type: ignore[assignment]
    bodies: list[bytes | dict[str, Any]] = [
        b"\xff\xfe\x00garbage", b"{not json", b"[]", b"null",
        {**SCALE, "spec": {**scale_spec, "replicas": False}},
        {**SCALE, "spec": {**scale_spec, "replicas": "3"}},
        {**SCALE, "spec": {**scale_spec, "replicas": 2.0}},
        {**SCALE, "ttl_seconds": 0.5}, {**SCALE, "ttl_seconds": "60"},
    ]
    for body in bodies:
        if isinstance(body, bytes):
            response = await plane.http.post(
                "/v1/edges/edge-1/commands", content=body,
                headers={"Content-Type": "application/json"})
        else:
            response = await plane.http.post("/v1/edges/edge-1/commands", json=body)
        assert 400 <= response.status_code < 500, (body, response.text)
        payload = response.json()
        assert set(payload) >= {"error", "message"}, (body, payload)
    assert (await plane.http.get("/v1/edges/edge-1/commands")).json() == []
    for path in ("/v1/nowhere", "/v1/edges/edge-1"):
        missing = await plane.http.get(path)
        assert missing.status_code in (404, 405) and set(missing.json()) == {"error", "message"}
    schema = (await plane.http.get("/openapi.json")).json()
    responses = schema["paths"]["/v1/commands/{command_id}"]["get"]["responses"]
    assert {"401", "403", "404"} <= set(responses)


@pytest.mark.parametrize("token", ["", "short", "a" * 40, "abababababababababababababab"])
async def test_a_weak_or_empty_bootstrap_token_stops_the_api_at_start(
        tmp_path: Path, token: str) -> None:
    """An empty EDGESYNC_API__OPERATOR_TOKEN never means 'anyone': the API refuses to start."""
    settings = ApiSettings(operator_token=token, port=0,
                           private_key_file=tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="operator_token is too weak"):
        async with Api(settings, NatsSettings()):
            pass


async def test_a_write_that_fails_unanswered_is_audited_as_a_500(
        plane: ControlPlane, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error no handler answers becomes Starlette's 500 outside the guard's audited
    send; the attempted write is in the audit log all the same."""
    from cloud_ingest.api import desired_routes

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in a write route")

    monkeypatch.setattr(desired_routes, "set_labels", broken)
    response = await plane.http.put("/v1/edges/edge-1/labels", json={"labels": {"a": "b"}})
    assert response.status_code == 500
    rows = (await plane.http.get("/v1/audit")).json()
    assert (rows[0]["operator"], rows[0]["status"]) == ("bootstrap", 500)
    assert (rows[0]["action"], rows[0]["target"]) == ("edge.label", "edge-1")
