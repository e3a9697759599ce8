"""Embedded servers do not outlive a process that dies without stopping them."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import alive, until

SCRIPT = """
import asyncio, sys
from pathlib import Path
from broker.runtime.embedded_nats import EmbeddedNats
from broker.runtime.embedded_postgres import EmbeddedPostgres

async def main() -> None:
    root = Path(sys.argv[1])
    nats = EmbeddedNats(root / "nats")
    pg = EmbeddedPostgres(root / "pg")
    await nats.start()
    await pg.start()
    print("PIDS", nats.pid, pg.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
async def test_servers_stop_when_their_parent_is_sigkilled(tmp_path: Path) -> None:
    """SIGKILL the process that started nats-server and PostgreSQL: both stop by
    themselves (the kernel's parent-death signal), nothing is left running."""
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = ""
        while not line.startswith("PIDS"):  # structlog also writes to stdout
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
            assert line, "the child exited before starting its servers"
        nats_pid, pg_pid = (int(x) for x in line.split()[1:])
        assert alive(nats_pid) and alive(pg_pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        for pid in (nats_pid, pg_pid):
            await until(lambda pid=pid: not alive(pid), timeout=20,
                        message=f"server {pid} outlived its parent")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        # A killed owner cannot remove its ephemeral cluster; pytest's tmp_path holds
        # only the symlink to where it was relocated (postgres_cluster), so remove that.
        data_dir = tmp_path / "pg"
        if data_dir.is_symlink():
            shutil.rmtree(data_dir.resolve(), ignore_errors=True)
