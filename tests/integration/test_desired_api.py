"""The desired-state API refuses bad input with a 4xx JSON body naming the problem, checks
scopes, and its CLI labels edges and sets an edge's desired state."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.runtime.embedded_nats import EmbeddedNats
from cloud_ingest.operators import add_operator
from tests.integration.control_harness import ControlPlane, control_plane, run_cli
from tests.support import until


@pytest.fixture
async def plane(tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
                ) -> AsyncIterator[ControlPlane]:
    async with control_plane(tmp_path, nats_server.url, pg_dsn) as the_plane:
        yield the_plane


REFUSALS: list[tuple[str, str, dict[str, Any] | None, int, str]] = [
    ("POST", "/v1/desired/edges/site-1", {"document": {"deployments": {"prod/web": {
        "replicas": "3"}}}}, 422, "document.deployments.prod/web.replicas"),
    ("POST", "/v1/desired/edges/site-1", {"document": {"deployments": {"web": {}}}}, 422,
     "'web' is not 'namespace/name'"),
    ("POST", "/v1/desired/edges/site-1", {"document": {"bridge": {"compression": "lz4"}}},
     422, "document.bridge.compression"),
    ("POST", "/v1/desired/groups/stores", {"document": {}}, 422,
     "group 'stores' is new: give its selector"),
    ("POST", "/v1/desired/groups/stores", {"document": {}, "selector": {"tier": "store"},
                                            "overrides": {"bad.edge": {}}}, 422,
     "'bad.edge' is not an edge id"),
    ("POST", "/v1/desired/groups/stores", {"document": {"configmaps": {"prod/c": {"k": "v"}}},
                                            "selector": {"tier": "store"},
                                            "overrides": {"site-1": {"configmaps": {
                                                "prod/c": {"k": 7}}}}}, 422,
     "document for edge site-1"),
    ("PUT", "/v1/edges/site-1/labels", {"labels": {"-bad": "x"}}, 422, "label key '-bad'"),
    ("GET", "/v1/desired/edges/site.1", None, 422, "edge"),  # a dotted name is no token
    ("GET", "/v1/desired/versions/999", None, 404, "no desired state for desired version 999"),
    ("GET", "/v1/rollouts/999", None, 404, "no rollout 999"),
    ("POST", "/v1/rollouts/999/pause", None, 404, "no rollout 999"),
    ("POST", "/v1/rollouts", {"version_id": 999}, 404, "no desired state"),
    ("GET", "/v1/desired/groups/nobody/diff", None, 404, "no group 'nobody'"),
]


async def test_bad_requests_are_refused_with_the_reason(plane: ControlPlane) -> None:
    """Each refusal is a 4xx whose JSON message names the problem (one plane for all)."""
    for method, path, body, status, message in REFUSALS:
        response = await plane.http.request(method, path, json=body)
        assert response.status_code == status, (path, body, response.text)
        assert message in response.json()["message"], (path, body, response.json())


async def test_a_rollout_needs_edges_and_valid_waves(plane: ControlPlane) -> None:
    created = await plane.http.post("/v1/desired/groups/stores", json={
        "document": {}, "selector": {"tier": "store"}})
    assert created.status_code == 201, created.text
    version = created.json()["id"]
    nobody = await plane.http.post("/v1/rollouts", json={"version_id": version})
    assert nobody.status_code == 422
    assert nobody.json()["message"].startswith("no edge is labelled tier=store")
    for edge in ("site-1", "site-2", "site-3", "site-4"):
        await plane.http.put(f"/v1/edges/{edge}/labels", json={"labels": {"tier": "store"}})
    bad = await plane.http.post("/v1/rollouts", json={"version_id": version,
                                                      "waves": ["50%", "1"]})
    assert bad.status_code == 422
    assert "cumulative and cannot go down" in bad.json()["message"]
    threshold = await plane.http.post("/v1/rollouts", json={"version_id": version,
                                                            "max_failures": "lots"})
    assert threshold.status_code == 422
    assert "max-failures 'lots'" in threshold.json()["message"]


async def test_changes_need_the_operate_scope(plane: ControlPlane) -> None:
    async with plane.api._db().acquire() as conn:
        token = await add_operator(conn, "viewer", ["read"], created_by="test")
    async with httpx.AsyncClient(base_url=plane.api.url, headers={
            "Authorization": f"Bearer {token}"}) as viewer:
        assert (await viewer.get("/v1/edges/site-1/labels")).status_code == 200
        refused = await viewer.put("/v1/edges/site-1/labels", json={"labels": {"a": "b"}})
        assert refused.status_code == 403
        assert "lacks the 'operate' scope" in refused.json()["message"]


async def test_the_cli_labels_an_edge_and_sets_its_desired_state(
        plane: ControlPlane, tmp_path: Path) -> None:
    api = ["--api-url", plane.api.url, "--token", plane.token]
    labelled = await run_cli("edges", "label", "site-1", "region=eu", "tier=store", *api)
    assert labelled.exit_code == 0, labelled.stderr
    assert "site-1: region=eu tier=store" in labelled.output
    document = tmp_path / "doc.json"
    document.write_text(json.dumps({"bridge": {"compression": "zstd"}}))
    sent = await run_cli("desired", *api, "set", "site-1", "-f", str(document))
    assert sent.exit_code == 0, sent.stderr
    assert "edge site-1 version 1" in sent.output and "sent as revision" in sent.output
    shown = await run_cli("desired", *api, "get", "site-1", "--json")
    assert shown.exit_code == 0, shown.stderr
    assert json.loads(shown.output)["sent"]["document"] == {"bridge": {"compression": "zstd"}}
    document.write_text("{not json")
    refused = await run_cli("desired", *api, "set", "site-1", "-f", str(document))
    assert refused.exit_code == 2 and "cannot read" in refused.stderr


async def test_an_offline_edge_fails_only_at_the_rollouts_offline_deadline(
        plane: ControlPlane) -> None:
    """An edge that never reports is pending past the wave deadline (it is offline), and
    counts failed once the rollout's offline deadline passes - which halts it."""
    await plane.http.put("/v1/edges/site-gone/labels", json={"labels": {"tier": "gone"}})
    created = await plane.http.post("/v1/desired/groups/gone", json={
        "document": {"bridge": {"compression": "zstd"}}, "selector": {"tier": "gone"}})
    rollout = (await plane.http.post("/v1/rollouts", json={
        "version_id": created.json()["id"], "waves": ["100%"], "wave_deadline_s": 0.1,
        "offline_deadline_s": 2.0})).json()

    async def state() -> dict[str, Any]:
        found: dict[str, Any] = (await plane.http.get(f"/v1/rollouts/{rollout['id']}")).json()
        return found

    pending = await until(lambda: _dispatched(state()), timeout=10)
    assert pending["state"] == "running"  # past the wave deadline, but offline: pending
    halted = await until(lambda: _in_state(state(), "halted"), timeout=15)
    assert halted["edges"][0]["status"] == "failed"
    assert halted["edges"][0]["reason"] == "offline past the rollout's offline deadline"


async def _dispatched(found: Awaitable[dict[str, Any]]) -> dict[str, Any] | None:
    got = await found
    return got if got["edges"][0]["status"] == "dispatched" else None


async def _in_state(found: Awaitable[dict[str, Any]], state: str) -> dict[str, Any] | None:
    got = await found
    return got if got["state"] == state else None
