"""The edge's disk fills up under load (ENOSPC on the buffer's filesystem).

One bridge's buffer directory is a small tmpfs the test mounts (skipped where
mounting is impossible). Both ingests stop, so the buffer grows until the
filesystem is full and the ingress answers 503 with ``Retry-After`` (the SDK
backs off and retries); then the filesystem grows again and the ingests return:
the bridge recovers by itself, with nothing acknowledged lost or duplicated.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.chaos.harness import Load, chaos_system
from tests.helpers import until
from tests.integration.test_disk_full import resize, small_tmpfs


async def test_the_edge_disk_filling_up_under_load_loses_nothing(tmp_path: Path) -> None:
    """Full disk: 503 + Retry-After, the bridge stays up; space back: it goes on by
    itself; every acknowledged record is one row."""
    with small_tmpfs(tmp_path / "buffer-edge-a", "4m") as disk:
        async with chaos_system(tmp_path) as system:
            bridge = system.bridges["edge-a"]
            async with Load(system, rate=3000.0) as load:
                await load.wait_acked(2_000)
                for ingest in system.ingests:
                    await ingest.stop()  # nothing is trimmed: the buffer grows

                async def refused_for_disk() -> bool:
                    async with httpx.AsyncClient() as http:
                        r = await http.post(f"{bridge.url}/v1/streams/probe/records",
                                            json={"records": [{"payload": {"x": "y" * 500}}]})
                    return r.status_code == 503 and "Retry-After" in r.headers and (
                        "disk is full" in r.json()["message"])

                await until(refused_for_disk, timeout=120, interval=0.5,
                            message="the buffer's disk never filled")
                async with httpx.AsyncClient() as http:
                    assert (await http.get(f"{bridge.url}/readyz")).status_code == 200
                full_at = time.monotonic()
                acked_when_full = len(load.acked)
                resize(disk, "256m")
                for ingest in system.ingests:
                    await ingest.start()
                await load.wait_acked(acked_when_full + 4_000, timeout=120)
                recovered = time.monotonic() - full_at
            await system.quiesce(load, timeout=180)
            outcome = await system.reconcile(
                "edge disk full (ENOSPC on a tmpfs under the buffer) under load, then space "
                "returns", load, recover_s=recovered,
                notes="ingress answered 503 + Retry-After while full; no restart",
            )
    assert outcome.lost == 0, outcome
    assert outcome.duplicated == 0, outcome
