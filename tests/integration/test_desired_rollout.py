"""Rollouts end to end: a group's desired version reaches ten edges (real NATS, real
PostgreSQL, a Kubernetes emulator per edge) in three health-gated waves; a failing
edge halts a rollout at its threshold and abort rolls the reached edges back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from broker.runtime.embedded_nats import EmbeddedNats
from tests.integration.control_harness import control_plane, run_cli
from tests.integration.desired_harness import BROKEN, console_page, fleet_edges
from tests.support import until

WEB_2 = {"deployments": {"prod/web": {"replicas": 3, "containers": {"app": {
    "image": "registry.local/web:2.0", "env": {"MODE": "fast"}}}}}}
WEB_1 = {"deployments": {"prod/web": {"replicas": 2, "containers": {"app": {
    "image": "registry.local/web:1.0", "env": {"MODE": "normal"}}}}}}
PLANE: dict[str, Any] = {"rollout_interval_s": 0.05, "edge_offline_after_s": 3.0}


async def test_a_rollout_reaches_ten_edges_in_three_health_gated_waves(
        tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str) -> None:
    edges = [f"site-{i:02d}" for i in range(10)]
    async with (
        control_plane(tmp_path, nats_server.url, pg_dsn, **PLANE) as plane,
        fleet_edges(plane, tmp_path, edges) as fleet,
    ):
        for edge in edges:
            await fleet.label(edge, tier="store", region="eu" if edge < "site-08" else "us")
        version = await fleet.set_group("stores", WEB_2, selector={"tier": "store"},
                                        overrides={"site-03": {"deployments": {"prod/web": {
                                            "replicas": 1}}}})
        rollout = await fleet.rollout(version, waves=["1", "50%", "100%"], max_failures="0",
                                      wave_deadline_s=20)
        paused = await plane.http.post(f"/v1/rollouts/{rollout}/pause")
        assert paused.status_code == 200 and paused.json()["state"] == "paused"

        async def first_wave_quiet() -> dict[str, Any] | None:
            found = await fleet.status(rollout)
            first = [e for e in found["edges"] if e["wave"] == 1]
            return found if all(e["status"] in ("waiting", "healthy") for e in first) else None

        await until(first_wave_quiet, timeout=30)
        assert await plane.api.drive_rollouts() == 0  # a paused rollout is not advanced
        held = await fleet.status(rollout)
        assert {e["status"] for e in held["edges"] if e["wave"] > 1} == {"waiting"}
        resumed = await plane.http.post(f"/v1/rollouts/{rollout}/resume")
        assert resumed.status_code == 200 and resumed.json()["state"] == "running"
        done = await fleet.wait_rollout(rollout, "completed", timeout=45)

        assert done["reason"] == "every edge healthy"
        assert [(w["wave"], w["edges"], w["healthy"]) for w in done["waves_progress"]] == [
            (1, 1, 1), (2, 4, 4), (3, 5, 5)]
        by_wave: dict[int, list[dict[str, Any]]] = {}
        for e in done["edges"]:
            by_wave.setdefault(e["wave"], []).append(e)
        for wave in (2, 3):  # each wave started only once the one before was healthy
            assert min(e["dispatched_at"] for e in by_wave[wave]) >= max(
                e["settled_at"] for e in by_wave[wave - 1])
        for edge in edges:
            assert fleet.image(edge) == "registry.local/web:2.0"
            assert fleet.replicas(edge) == (1 if edge == "site-03" else 3)
            view = await fleet.edge_view(edge)
            assert view["in_sync"], view
            assert view["reported"]["observed"]["deployments"]["prod/web"]["replicas"] == (
                1 if edge == "site-03" else 3)
        # Only what differed was written: the proxy container and other env untouched.
        containers = fleet.kubes["site-00"].obj(
            "apps/v1/deployments", "prod", "web")["spec"]["template"]["spec"]["containers"]
        assert containers[1] == {"name": "proxy", "image": "registry.local/proxy:3"}
        assert [e["name"] for e in containers[0]["env"]] == ["MODE", "REGION", "DEBUG"]

        cli = await run_cli("rollout", "--api-url", plane.api.url, "--token", plane.token,
                            "status", str(rollout))
        assert cli.exit_code == 0, cli.stderr
        assert "completed" in cli.output and "wave" in cli.output

        # The console shows the same progress per wave.
        page = await console_page(plane, "/ui/rollouts")
        assert f"Rollout {rollout}: group stores version 1" in page
        for wave, edges_in_wave in ((1, 1), (2, 4), (3, 5)):
            assert f'aria-label="wave {wave}: {edges_in_wave} of {edges_in_wave} healthy"' in page


async def test_a_failing_edge_halts_the_rollout_and_abort_rolls_back(
        tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str) -> None:
    edges = ["site-a", "site-b", "site-c", "site-d"]
    async with (
        control_plane(tmp_path, nats_server.url, pg_dsn, **PLANE) as plane,
        fleet_edges(plane, tmp_path, edges, desired_health_timeout_s=1.5) as fleet,
    ):
        for edge in edges:
            await fleet.label(edge, tier="store")
        v1 = await fleet.set_group("stores", WEB_1, selector={"tier": "store"})
        first = await fleet.rollout(v1, waves=["100%"])
        await fleet.wait_rollout(first, "completed")

        v2 = await fleet.set_group("stores", WEB_2, overrides={"site-b": {"deployments": {
            "prod/web": {"containers": {"app": {"image": BROKEN}}}}}})
        second = await fleet.rollout(v2, waves=["50%", "100%"], max_failures="0",
                                     wave_deadline_s=20)
        halted = await fleet.wait_rollout(second, "halted")

        assert halted["reason"] == "1 edge(s) failed, more than the 0 tolerated (0)"
        states = {e["edge"]: (e["status"], e["reason"]) for e in halted["edges"]}
        assert states["site-a"] == ("healthy", "")
        assert states["site-b"][0] == "failed"
        assert "0 of 3 updated replicas available" in states["site-b"][1]
        assert states["site-c"][0] == states["site-d"][0] == "waiting"  # wave 2 never sent
        assert fleet.image("site-b") == BROKEN

        response = await plane.http.post(f"/v1/rollouts/{second}/abort")
        assert response.status_code == 200, response.text
        aborted = await fleet.wait_rollout(second, "aborted")

        async def rolled_back() -> dict[str, Any] | None:
            found = await fleet.status(second)
            statuses = {e["edge"]: e["status"] for e in found["edges"]}
            return found if statuses == {"site-a": "rolled_back", "site-b": "rolled_back",
                                         "site-c": "skipped", "site-d": "skipped"} else None

        await until(rolled_back, timeout=20, message="edges never rolled back")
        assert aborted["reason"].startswith("aborted by ")
        for edge in edges:  # every field version 1 manages is back
            assert fleet.image(edge) == "registry.local/web:1.0"
            assert fleet.replicas(edge) == 2
            view = await fleet.edge_view(edge)
            assert view["version_id"] == v1
            assert view["in_sync"], view
        assert fleet.images_ever("site-c") == {"registry.local/web:1.0"}

        again = await plane.http.post(f"/v1/rollouts/{second}/resume")
        assert again.status_code == 409
        assert again.json() == {"error": "rollout_state", "message": (
            f"rollout {second} is aborted; resume needs it paused")}
