"""`edgesync up` runs secured, as production should: TLS and auth on NATS, a
password on PostgreSQL, private state; `edgesync edges add|revoke` work against it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import nats
import pytest

from broker.connecting import connect_options
from broker.protocol.permissions import inbox_prefix
from broker.protocol.topology import Topology
from broker.runtime.embedded_postgres import server_os_group
from broker.settings import NatsSettings
from tests.helpers import until
from tests.integration.control_harness import run_cli


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def connect_edge(runtime: dict[str, Any], edge: str, creds: Path) -> nats.NATS:
    settings = NatsSettings(url=runtime["nats_url"], ca_file=runtime["nats_ca_file"],
                            credentials_file=creds)
    return await nats.connect(runtime["nats_url"], allow_reconnect=False, connect_timeout=3,
                              **connect_options(settings,
                                                inbox_prefix=inbox_prefix(Topology(), "edge",
                                                                          edge)))


async def test_up_runs_secured_and_edges_are_provisioned_and_revoked(
    tmp_path: Path, reachable_dir: Path
) -> None:
    """runtime.json names each edge's credentials and the CA; secrets are 0600 and
    state 0700 (0710 for the PostgreSQL server's group alone when run as root);
    anonymous NATS and password-less PostgreSQL are refused; an edge
    added by the CLI connects and reads its control consumer, and once revoked it
    is refused."""
    state = reachable_dir / "state"  # edgesync up keeps its PostgreSQL cluster there
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "up", "--edges", "2", "--state-dir", str(state),
         "--bridge-port", "0", "--api-port", "0"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        runtime_file = state / "runtime.json"
        await until(runtime_file.exists, timeout=60, interval=0.1,
                    message="runtime.json never appeared")
        runtime = json.loads(runtime_file.read_text())
        assert runtime["nats_url"].startswith("nats://127.0.0.1:")
        assert sorted(runtime["nats_credentials"]) == ["edge-1", "edge-2"]
        assert len(runtime["operator_token"]) >= 24

        # Private state.
        server_group = server_os_group()
        if server_group is None:
            assert mode(state) == 0o700
        else:  # the server's OS user may only traverse it, to reach its cluster
            assert mode(state) == 0o710 and state.stat().st_gid == server_group
        assert mode(runtime_file) == 0o600
        for creds in runtime["nats_credentials"].values():
            assert mode(Path(creds)) == 0o600
        for directory in ("nats", "nats-auth", "tls", "bridge-edge-1", "keys"):
            assert mode(state / directory) & 0o077 == 0, directory
        assert mode(state / "tls" / "ca.key") == 0o600
        assert mode(state / "tls" / "nats-server.key") == 0o600
        # Its logs too: the state dir may be traversable by PostgreSQL's OS user.
        assert mode(state / "nats.log") == 0o600

        # NATS: TLS + an identity, or nothing.
        ca = runtime["nats_ca_file"]
        nc = await connect_edge(runtime, "edge-1", Path(runtime["nats_credentials"]["edge-1"]))
        await nc.close()
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(runtime["nats_url"], allow_reconnect=False, connect_timeout=3,
                               **connect_options(NatsSettings(url=runtime["nats_url"],
                                                              ca_file=ca)))

        # PostgreSQL: the DSN carries the password; without it, no entry.
        conn = await asyncpg.connect(runtime["postgres_dsn"])
        await conn.close()
        parts = urlsplit(runtime["postgres_dsn"])
        no_password = urlunsplit(parts._replace(
            netloc=f"{parts.username}@{parts.hostname}:{parts.port}"))
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(no_password, ssl=False)

        # Provisioning through the CLI, against the running server.
        added = await run_cli("edges", "add", "edge-9", "--state-dir", str(state))
        assert added.exit_code == 0, added.output + added.stderr
        creds = state / "nats-auth" / "creds" / "edge-edge-9.nk"
        assert mode(creds) == 0o600

        async def connects() -> bool:
            try:
                nc = await connect_edge(runtime, "edge-9", creds)
            except nats.errors.Error:
                return False  # the reload is asynchronous
            try:
                js = nc.jetstream(timeout=5)
                info = await js.consumer_info("ES_CONTROL", "ctl-edge-9")
                return bool(info.config.filter_subject == "es.ctl.edge-9")
            finally:
                await nc.close()

        await until(connects, timeout=15, message="the added edge cannot connect")
        listed = await run_cli("edges", "list", "--state-dir", str(state))
        assert "edge-9" in listed.output
        # The admin step finds the running system the same way (TLS, admin identity).
        checked = await run_cli("streams", "check", "--state-dir", str(state))
        assert checked.exit_code == 0 and "ES_RECORDS" in checked.output, checked.output

        saved = creds.read_bytes()
        revoked = await run_cli("edges", "revoke", "edge-9", "--state-dir", str(state))
        assert revoked.exit_code == 0, revoked.output + revoked.stderr
        creds.write_bytes(saved)  # the edge kept its copy

        async def refused() -> bool:
            try:
                nc = await connect_edge(runtime, "edge-9", creds)
            except nats.errors.Error as exc:
                return "Authorization Violation" in str(exc)
            await nc.close()
            return False

        await until(refused, timeout=15, message="the revoked edge still connects")

        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, (tmp_path / "up.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
