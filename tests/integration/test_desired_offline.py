"""An edge offline during a rollout is pending, not failed; when a newer version is
rolled out meanwhile, the edge applies only the newest when it returns (the desired
state bucket keeps one value per edge)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from broker.runtime.embedded_nats import EmbeddedNats
from tests.integration.control_harness import control_plane
from tests.integration.desired_harness import fleet_edges
from tests.support import until


def web(image: str) -> dict[str, Any]:
    return {"deployments": {"prod/web": {"containers": {"app": {"image": image}}}}}


async def test_an_edge_back_from_offline_applies_only_the_newest_version(
        tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str) -> None:
    async with (
        control_plane(tmp_path, nats_server.url, pg_dsn, rollout_interval_s=0.05,
                      edge_offline_after_s=3.0) as plane,
        fleet_edges(plane, tmp_path, ["site-a", "site-b"], start=False) as fleet,
    ):
        await fleet.start("site-a")  # site-b stays offline for now
        for edge in ("site-a", "site-b"):
            await fleet.label(edge, tier="store")
        v2 = await fleet.set_group("stores", web("registry.local/web:2.0"),
                                   selector={"tier": "store"})
        first = await fleet.rollout(v2, waves=["100%"], wave_deadline_s=3)

        async def site_a_healthy(rollout: int) -> dict[str, Any] | None:
            found = await fleet.status(rollout)
            statuses = {e["edge"]: e["status"] for e in found["edges"]}
            return found if statuses.get("site-a") == "healthy" else None

        await until(lambda: site_a_healthy(first), timeout=20)
        # Past the wave deadline the offline edge is still pending, not failed.
        pending = await until(lambda: _after_deadline(fleet, first, 3.0), timeout=10)
        assert pending["state"] == "running"
        assert {e["edge"]: e["status"] for e in pending["edges"]} == {
            "site-a": "healthy", "site-b": "dispatched"}

        v3 = await fleet.set_group("stores", web("registry.local/web:3.0"))
        second = await fleet.rollout(v3, waves=["100%"], wave_deadline_s=20)
        await until(lambda: site_a_healthy(second), timeout=20)
        done_first = await fleet.wait_rollout(first, "completed")
        assert {e["edge"]: e["status"] for e in done_first["edges"]} == {
            "site-a": "healthy", "site-b": "superseded"}

        await fleet.start("site-b")  # back after "a week"
        done = await fleet.wait_rollout(second, "completed", timeout=30)
        assert {e["edge"]: e["status"] for e in done["edges"]} == {
            "site-a": "healthy", "site-b": "healthy"}
        assert fleet.image("site-b") == "registry.local/web:3.0"
        # Version 2 never reached site-b's cluster: one write, straight to 3.0.
        assert fleet.images_ever("site-b") == {"registry.local/web:1.0",
                                               "registry.local/web:3.0"}
        view = await fleet.edge_view("site-b")
        assert view["in_sync"] and view["reported"]["applied"] == ["deployment.set_image"]


async def _after_deadline(fleet: Any, rollout: int, deadline_s: float) -> dict[str, Any] | None:
    """The rollout once its wave deadline has passed (by the database's clock)."""
    found: dict[str, Any] = await fleet.status(rollout)
    async with fleet.plane.api._db().acquire() as conn:
        passed = await conn.fetchval(
            "SELECT now() > wave_started_at + make_interval(secs => $2) FROM rollouts"
            " WHERE id = $1", rollout, deadline_s + 0.5)
    return found if passed else None
