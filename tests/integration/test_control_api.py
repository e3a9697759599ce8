"""The operator API's refusals and contracts: 422 with a message for bad specs, 404 for
unknown edges and commands, 401 without the operator token, idempotency keys, docs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.runtime.embedded_nats import EmbeddedNats
from tests.integration.control_harness import ControlPlane, control_plane
from tests.integration.harness import bridge_settings, running_bridge

SCALE = {"kind": "deployment.scale",
         "spec": {"namespace": "prod", "name": "web", "replicas": 2}}


@pytest.fixture
async def plane(tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str):  # type: ignore[no-untyped-def]
    """An API and ingest, and edge-1 known to them (a plain bridge's heartbeats)."""
    async with (
        control_plane(tmp_path, nats_server.url, pg_dsn, max_ttl_s=3600) as plane,
        running_bridge(bridge_settings(tmp_path, heartbeat_interval_s=0.1), nats_server.url),
    ):
        await plane.wait_edge("edge-1")
        yield plane


async def post(plane: ControlPlane, body: Any, edge: str = "edge-1",
               headers: dict[str, str] | None = None) -> httpx.Response:
    return await plane.http.post(f"/v1/edges/{edge}/commands", json=body, headers=headers)


BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"kind": "deployment.scale", "spec": {"namespace": "prod", "name": "web", "replicas": -1}},
     "deployment.scale.spec.replicas: Input should be greater than or equal to 0"),
    ({"kind": "deployment.scale", "spec": {"namespace": "prod", "name": "web"}},
     "deployment.scale.spec.replicas: Field required"),
    ({"kind": "deployment.set_env", "spec": {"namespace": "prod", "name": "web", "env": {}}},
     "deployment.set_env.spec.env: Dictionary should have at least 1 item"),
    ({"kind": "deployment.set_image", "spec": {"namespace": "prod", "name": "web",
                                               "container": "app", "image": "has space"}},
     "deployment.set_image.spec.image: String should match pattern"),
    ({"kind": "deployment.restart", "spec": {"namespace": "Prod!", "name": "web"}},
     "deployment.restart.spec.namespace: String should match pattern"),
    ({"kind": "bridge.configure", "spec": {"linger_ms": -5}},
     "bridge.configure.spec.linger_ms: Input should be greater than or equal to 0"),
    ({"kind": "bridge.configure", "spec": {"batch_size": 5}},
     "bridge.configure.spec.batch_size: Extra inputs are not permitted"),
    ({"kind": "deployment.delete", "spec": {}},
     "Input tag 'deployment.delete' found using 'kind' does not match any of the expected"),
    ({**SCALE, "ttl_seconds": 0}, "deployment.scale.ttl_seconds: Input should be greater than 0"),
    ({**SCALE, "ttl_seconds": 7200}, "ttl_seconds: 7200 exceeds the maximum of 3600"),
]


async def test_bad_requests_get_422_with_a_message_naming_the_field(plane: ControlPlane) -> None:
    """Every kind's spec is validated before anything is signed or stored."""
    for body, message in BAD_REQUESTS:
        response = await post(plane, body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["error"] == "invalid_request"
        assert message in response.json()["message"], (body, response.json()["message"])
    assert (await plane.http.get("/v1/edges/edge-1/commands")).json() == []


async def test_unknown_edges_and_commands_get_404(plane: ControlPlane) -> None:
    """An edge that never sent a heartbeat, an invalid edge id, an unknown command id."""
    for edge in ("edge-404", "no.dots"):
        response = await post(plane, SCALE, edge=edge)
        assert response.status_code == 404, response.text
        assert response.json()["error"] == "unknown_edge"
    assert (await plane.http.get("/v1/edges/edge-404/commands")).status_code == 404
    missing = await plane.http.get("/v1/commands/00000000-0000-4000-8000-000000000000")
    assert missing.status_code == 404 and missing.json()["error"] == "unknown_command"
    assert (await plane.http.get("/v1/commands/not-a-uuid")).status_code == 404


async def test_writes_without_the_operator_token_get_401_and_store_nothing(
        plane: ControlPlane) -> None:
    """No token, a wrong token, the wrong scheme: 401 before validation; reads too
    (tests/integration/test_api_auth.py has the rest of the gate)."""
    async with httpx.AsyncClient(base_url=plane.api.url) as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": f"Basic {plane.token}"}):
            response = await anonymous.post("/v1/edges/edge-1/commands", json={"bogus": 1},
                                            headers=headers)
            assert response.status_code == 401, response.text
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json()["error"] == "unauthorized"
        assert (await anonymous.get("/v1/edges")).status_code == 401
    assert (await plane.http.get("/v1/edges/edge-1/commands")).json() == []


async def test_an_accepted_command_is_202_pending_with_its_location(plane: ControlPlane) -> None:
    response = await post(plane, SCALE)
    assert response.status_code == 202
    accepted = response.json()
    assert accepted["status"] == "pending" and accepted["duplicate"] is False
    assert response.headers["location"] == f"/v1/commands/{accepted['id']}"
    command = await plane.command(accepted["id"])
    assert command["spec"] == SCALE["spec"] and command["issuer"] == "bootstrap@edgesync-api"
    assert command["published_at"] is not None  # in JetStream, waiting for the edge
    listed = (await plane.http.get("/v1/edges/edge-1/commands?status=pending")).json()
    assert [c["id"] for c in listed] == [accepted["id"]]
    assert (await plane.http.get("/v1/edges/edge-1/commands?status=applied")).json() == []
    assert (await plane.http.get("/v1/edges/edge-1/commands?status=bogus")).status_code == 422


async def test_an_idempotency_key_returns_the_same_command_and_refuses_a_different_one(
        plane: ControlPlane) -> None:
    first = await post(plane, SCALE, headers={"Idempotency-Key": "deploy-42"})
    again = await post(plane, SCALE, headers={"Idempotency-Key": "deploy-42"})
    assert again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.json()["duplicate"] is True
    other = {**SCALE, "spec": {**SCALE["spec"], "replicas": 9}}  # type: ignore[dict-item]
    clash = await post(plane, other, headers={"Idempotency-Key": "deploy-42"})
    assert clash.status_code == 409 and clash.json()["error"] == "idempotency_conflict"
    assert len((await plane.http.get("/v1/edges/edge-1/commands")).json()) == 1


async def test_edges_are_listed_online_and_the_openapi_docs_are_served(
        plane: ControlPlane) -> None:
    [edge] = (await plane.http.get("/v1/edges")).json()
    assert edge["edge"] == "edge-1" and edge["online"] is True and edge["version"]
    schema = (await plane.http.get("/openapi.json")).json()
    assert "/v1/edges/{edge}/commands" in schema["paths"]
    assert "DeploymentScale" in schema["components"]["schemas"]
    assert (await plane.http.get("/docs")).status_code == 200
    metrics = (await plane.http.get("/metrics")).text
    assert "edgesync_api_requests_total" in metrics


async def test_a_wait_that_times_out_says_which_side_of_nats_the_command_waits_on(
        plane: ControlPlane, nats_server: EmbeddedNats) -> None:
    """`cmd ... --wait` past its timeout says whether the command reached NATS (the
    edge has not reported) or not (the API could not publish it); it said "sent", then
    only "still pending", when NATS was away."""
    published = await plane.cli("configure", "edge-1", "--linger-ms", "5", "--wait",
                                "--timeout", "1")
    assert published.exit_code == 3, published
    assert "accepted (bridge.configure on edge-1)" in published.output
    assert "still pending after 1s: published; the edge has not reported" in published.stderr
    await nats_server.stop()
    try:
        stored = await plane.cli("configure", "edge-1", "--linger-ms", "6", "--wait",
                                 "--timeout", "1")
    finally:
        await nats_server.start()
    assert stored.exit_code == 3, stored
    assert "not yet published: the API could not reach NATS" in stored.stderr
