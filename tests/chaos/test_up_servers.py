"""`edgesync up` keeps its embedded servers: one that dies is started again on its
port and its data, and the pipeline carries on with nothing missing."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import asyncpg

from broker.pg_connecting import connected
from tests.support import alive, edgesync_up, until


async def _committed(dsn: str) -> int:
    async with connected(dsn) as conn:
        return int(await conn.fetchval("SELECT count(*) FROM records"))


async def _grown_past(dsn: str, rows: int) -> bool:
    try:
        return await _committed(dsn) > rows
    except (OSError, asyncpg.PostgresError):
        return False  # PostgreSQL not back yet


async def _nothing_missing(dsn: str) -> bool:
    async with connected(dsn) as conn:
        return bool(await conn.fetchval(
            "SELECT coalesce(sum(missing_records), 0) = 0 FROM v_completeness"))


def _runtime(state: Path) -> dict[str, Any]:
    try:
        value: dict[str, Any] = json.loads((state / "runtime.json").read_text())
    except (OSError, ValueError):
        return {}
    return value


async def test_up_restarts_its_nats_server_and_postgres_when_they_are_killed(
    tmp_path: Path, reachable_dir: Path
) -> None:
    """SIGKILL `edgesync up`'s nats-server, then its PostgreSQL, under a simulated load:
    `up` starts each again (runtime.json names the new pid), rows keep growing, and
    nothing is missing."""
    state = reachable_dir / "state"
    async with edgesync_up(tmp_path, "--simulate", "300", "--bridge-port", "0",
                           "--api-port", "0", state=state) as up:
        dsn = str(up.runtime["postgres_dsn"])
        # Every service connected and committing first (a kill during start-up is
        # test_up_nats_server_killed_while_the_services_connect).
        await until(lambda: _grown_past(dsn, 0), timeout=30, interval=0.25,
                    message="nothing committed before the faults")
        for key in ("nats_pid", "postgres_pid"):
            rows = await _committed(dsn)
            old = int(_runtime(state)[key])
            os.kill(old, signal.SIGKILL)
            await until(lambda old=old, key=key: _runtime(state).get(key) not in (None, old),
                        timeout=30, interval=0.2, message=f"{key}: not started again")
            assert alive(int(_runtime(state)[key]))
            await until(lambda rows=rows: _grown_past(dsn, rows + 300), timeout=60,
                        interval=0.25, message=f"rows stopped growing after {key} was killed")
        await until(lambda: _nothing_missing(dsn), timeout=60, interval=0.25,
                    message="records missing after the restarts")
        assert up.proc.poll() is None, up.log_tail()
        assert "exited unexpectedly; starting it again" in up.log_file.read_text(errors="replace")
        assert up.interrupt() == 0, up.log_tail()


async def test_up_nats_server_killed_while_the_services_connect(
    tmp_path: Path, reachable_dir: Path
) -> None:
    """SIGKILL `edgesync up`'s nats-server as soon as `up` reports ready, while the
    bridge may still be in its first connect (its TLS handshake cut: nats-py never
    returned from it, and the bridge shipped nothing until restarted). Once nats-server
    is started again, records are committed and nothing is missing.
    (tests/integration/test_nats_connecting.py cuts the handshake deterministically.)"""
    state = reachable_dir / "state"
    async with edgesync_up(tmp_path, "--simulate", "300", "--bridge-port", "0",
                           "--api-port", "0", state=state) as up:
        dsn = str(up.runtime["postgres_dsn"])
        old = int(up.runtime["nats_pid"])
        os.kill(old, signal.SIGKILL)
        await until(lambda: _runtime(state).get("nats_pid") not in (None, old),
                    timeout=30, interval=0.1, message="nats_pid: not started again")
        await until(lambda: _grown_past(dsn, 300), timeout=60, interval=0.25,
                    message="nothing committed after nats-server was killed during start-up")
        await until(lambda: _nothing_missing(dsn), timeout=60, interval=0.25,
                    message="records missing after the restart")
        assert up.proc.poll() is None, up.log_tail()
        assert up.interrupt() == 0, up.log_tail()
