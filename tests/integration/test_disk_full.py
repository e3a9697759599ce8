"""The edge's disk fills up (ENOSPC on the buffer's filesystem): back-pressure, no loss.

The buffer lives on a small tmpfs the test mounts (root and mount rights needed;
skipped otherwise). The longer version under load is in
``tests/chaos/test_disk_full.py``.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from broker.pg_connecting import connected
from broker.runtime.embedded_nats import EmbeddedNats
from tests.helpers import until
from tests.integration.harness import (
    bridge_settings,
    running_bridge,
    running_ingest,
    wait_for_records,
)

__all__ = ["fill_until_full", "small_tmpfs"]

PAD = "x" * 2_000


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``path`` for the duration; skip if we cannot."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def resize(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


async def post(http: httpx.AsyncClient, url: str, start: int, n: int = 20) -> httpx.Response:
    body = {"records": [{"payload": {"i": start + k, "pad": PAD}} for k in range(n)]}
    return await http.post(f"{url}/v1/streams/s/records", json=body)


async def fill_until_full(http: httpx.AsyncClient, url: str, acked: list[int],
                          *, limit: int = 10_000) -> httpx.Response:
    """Post until the bridge refuses; every accepted ``i`` goes to ``acked``."""
    for _ in range(limit):
        response = await post(http, url, len(acked))
        if response.status_code != 200:
            return response
        acked.extend(range(len(acked), len(acked) + 20))
    raise AssertionError("the disk never filled")


@pytest.fixture
async def tmpfs(tmp_path: Path) -> AsyncIterator[Path]:
    with small_tmpfs(tmp_path / "disk", "3m") as path:
        yield path


async def test_a_full_disk_answers_503_and_the_bridge_recovers_when_space_returns(
    tmp_path: Path, tmpfs: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """With the buffer's filesystem full, the ingress answers 503 with Retry-After and
    stays up; nothing acknowledged is lost; once space returns (no restart) records
    are accepted again, and every acknowledged record is committed exactly once."""
    settings = bridge_settings(tmp_path, buffer_dir=tmpfs / "buffer",
                               buffer_max_bytes=512 * 1024**2)  # the disk, not the cap, runs out
    acked: list[int] = []
    async with running_bridge(settings, nats_server.url) as bridge, httpx.AsyncClient() as http:
        refused = await fill_until_full(http, bridge.url, acked)
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"] == "buffer_full"
        assert "disk is full" in refused.json()["message"]
        assert (await http.get(f"{bridge.url}/readyz")).status_code == 200
        assert (await post(http, bridge.url, len(acked))).status_code == 503  # still full

        resize(tmpfs, "64m")  # space returns; the same bridge goes on

        async def accepted() -> bool:
            response = await post(http, bridge.url, len(acked))
            if response.status_code == 200:
                acked.extend(range(len(acked), len(acked) + 20))
            return response.status_code == 200

        await until(accepted, timeout=15, message="the bridge did not recover by itself")
        async with running_ingest(pg_dsn, nats_server.url):
            await wait_for_records(pg_dsn, len(acked), timeout=60)
    async with connected(pg_dsn) as conn:
        committed = [r[0] for r in await conn.fetch("SELECT (payload->>'i')::int FROM records")]
    assert sorted(committed) == acked  # each acknowledged record once, nothing else
