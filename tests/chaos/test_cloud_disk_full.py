"""The cloud's disk fills up under load: PostgreSQL's data directory (tables and WAL)
is on a small tmpfs the test mounts (skipped where mounting is impossible), and a
filler file takes its last byte while the edges keep producing. Nothing the edges
acknowledged is dead-lettered, lost or doubled: the ingests wait the outage out, the
records wait in JetStream and the edges' buffers, and once the space is back (and
PostgreSQL restarted, if it stopped) every acknowledged record commits exactly once."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.pg_connecting import connected
from tests.chaos.harness import ChaosSystem, Load, chaos_system
from tests.chaos.test_process_kills import assert_reconciles_exactly
from tests.helpers import until


@contextlib.contextmanager
def pg_disk(size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` under /tmp that PostgreSQL's OS user can reach; skip if it
    cannot be mounted."""
    mount = Path(tempfile.mkdtemp(prefix="edgesync-pgdisk-"))
    mount.chmod(0o711)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0711", "tmpfs",
                              str(mount)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            mount.rmdir()


def fill(path: Path) -> int:
    """Write ``path`` until its filesystem is full; the bytes written."""
    written = 0
    chunk = b"\0" * (1 << 20)
    with path.open("wb") as f:
        while True:
            try:
                written += os.write(f.fileno(), chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return written
                chunk = chunk[: len(chunk) // 16 or 1]


async def test_the_cloud_disk_filling_up_under_load_loses_and_dead_letters_nothing(
    tmp_path: Path,
) -> None:
    with pg_disk("256m") as disk:
        async with chaos_system(tmp_path, pg_dir=disk / "data") as system:
            async with Load(system) as load:
                await load.wait_acked(2_000)
                filler = disk / "filler"
                fill(filler)
                full_at = time.monotonic()
                acked_when_full = len(load.acked)
                await _wait_for_the_outage(system)
                # The edges go on for a while (~10 s): their records wait in JetStream.
                await load.wait_acked(acked_when_full + 40_000, timeout=90)
                filler.unlink()
                if not system.pg.running:
                    await system.pg.start()
                await load.wait_acked(len(load.acked) + 3_000, timeout=120)
                recovered = time.monotonic() - full_at
            await assert_reconciles_exactly(
                system, load, "cloud disk full (ENOSPC under PostgreSQL) under load, then "
                "space returns", timeout=180, notes=f"recovered in {recovered:.0f} s")
            async with connected(system.dsn) as conn:
                dead = await conn.fetchval("SELECT count(*) FROM dead_letters")
            assert dead == 0, "records dead-lettered for the database's disk"


async def _wait_for_the_outage(system: ChaosSystem) -> None:
    logs = [system.tmp / f"ingest-{i}.log" for i in range(len(system.ingests))]

    def failing() -> bool:
        return any("No space left" in p.read_text() or "DiskFull" in p.read_text()
                   or "database_unavailable" in p.read_text() for p in logs)

    await until(failing, timeout=60, interval=0.5, message="the ingests never saw the disk full")
