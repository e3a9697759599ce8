"""Drift: a change made behind the system's back (``kubectl scale`` at the site) is
reported within one re-check interval and left alone (no self-heal by default); an
imperative command that diverges shows as drift linked to that command; the next
desired version brings the edge back in sync. With self-heal on, drift is undone."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from broker.runtime.embedded_nats import EmbeddedNats
from tests.integration.control_harness import DEPLOYMENTS, control_plane, run_cli
from tests.integration.desired_harness import Fleet, console_page, fleet_edges
from tests.support import until

RECHECK_S = 1.0
WEB = {"deployments": {"prod/web": {"replicas": 3, "containers": {"app": {
    "image": "registry.local/web:2.0"}}}},
    "configmaps": {"prod/settings": {"color": "green"}}}


async def set_edge(fleet: Fleet, edge: str, document: dict[str, Any]) -> int:
    response = await fleet.plane.http.post(f"/v1/desired/edges/{edge}",
                                           json={"document": document, "note": "test"})
    assert response.status_code == 201, response.text
    return int(response.json()["revision"])


async def drift_of(fleet: Fleet, edge: str, path: str) -> dict[str, Any] | None:
    view = await fleet.edge_view(edge)
    found = [d for d in view["drift"] if d["path"] == path]
    return {**found[0], "view": view} if found else None


async def in_sync(fleet: Fleet, edge: str, revision: int) -> bool:
    view = await fleet.edge_view(edge)
    return bool(view["in_sync"] and view["reported_revision"] == revision)


async def test_drift_behind_the_back_is_reported_within_one_recheck_and_left(
        tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str) -> None:
    async with (
        control_plane(tmp_path, nats_server.url, pg_dsn) as plane,
        fleet_edges(plane, tmp_path, ["site-a"],
                    desired_recheck_interval_s=RECHECK_S) as fleet,
    ):
        await plane.wait_edge("site-a")
        revision = await set_edge(fleet, "site-a", WEB)
        await until(lambda: in_sync(fleet, "site-a", revision), timeout=20)
        assert fleet.replicas("site-a") == 3
        assert fleet.kubes["site-a"].obj("v1/configmaps", "prod", "settings")["data"] == {
            "color": "green", "size": "m", "legacy": "yes"}  # only the managed key changed

        # Someone runs `kubectl scale --replicas=5` at the site.
        fleet.kubes["site-a"].emulator.objects[DEPLOYMENTS, "prod", "web"].patch(
            {"spec": {"replicas": 5}})
        changed = time.monotonic()
        found = await until(lambda: drift_of(fleet, "site-a", "deployments.prod/web.replicas"),
                            timeout=10, interval=0.05)
        elapsed = time.monotonic() - changed
        assert elapsed < RECHECK_S + 1.0, elapsed  # one re-check, plus the trip to the cloud
        assert (found["desired"], found["observed"]) == (3, 5)
        assert found["command_id"] is None  # nobody asked for it through edgesync
        assert found["view"]["reported_status"] == "drifted"
        assert not found["view"]["in_sync"]
        assert fleet.replicas("site-a") == 5  # reported, not undone
        page = await console_page(plane, "/ui/edges/site-a")  # the console's edge view
        assert "<code>deployments.prod/web.replicas</code>" in page
        assert "a change outside edgesync" in page

        # An operator's one-off command diverges too, and the drift names it.
        command = await plane.issue("site-a", "deployment.set_image", {
            "namespace": "prod", "name": "web", "container": "app",
            "image": "registry.local/web:hotfix"})
        await plane.wait_status(command)
        path = "deployments.prod/web.containers.app.image"
        image = await until(lambda: drift_of(fleet, "site-a", path), timeout=10)
        assert (image["desired"], image["observed"]) == ("registry.local/web:2.0",
                                                         "registry.local/web:hotfix")
        assert (image["command_id"], image["command_kind"]) == (command,
                                                                "deployment.set_image")

        page = await console_page(plane, "/ui/edges/site-a")  # the console's edge view
        assert "<code>deployments.prod/web.containers.app.image</code>" in page
        assert f'<a href="/ui/commands/{command}">deployment.set_image</a>' in page

        cli = await run_cli("desired", "--api-url", plane.api.url, "--token", plane.token,
                            "diff", "site-a")
        assert cli.exit_code == 1, cli.stderr
        assert "deployments.prod/web.replicas" in cli.output and "drifted" in cli.output

        # The next desired version applies the difference again.
        again = await set_edge(fleet, "site-a", WEB)
        await until(lambda: in_sync(fleet, "site-a", again), timeout=20)
        assert fleet.replicas("site-a") == 3
        assert fleet.image("site-a") == "registry.local/web:2.0"
        view = await fleet.edge_view("site-a")
        assert sorted(view["reported"]["applied"]) == ["deployment.scale",
                                                       "deployment.set_image"]


async def test_self_heal_undoes_drift_at_the_next_recheck(
        tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str) -> None:
    async with (
        control_plane(tmp_path, nats_server.url, pg_dsn) as plane,
        fleet_edges(plane, tmp_path, ["site-a"], desired_recheck_interval_s=RECHECK_S,
                    desired_correct_drift=True) as fleet,
    ):
        revision = await set_edge(fleet, "site-a", WEB)
        await until(lambda: in_sync(fleet, "site-a", revision), timeout=20)
        fleet.kubes["site-a"].emulator.objects[DEPLOYMENTS, "prod", "web"].patch(
            {"spec": {"replicas": 7}})
        await until(lambda: fleet.replicas("site-a") == 3, timeout=RECHECK_S + 5,
                    message="drift was not undone")
        await until(lambda: in_sync(fleet, "site-a", revision), timeout=10)
