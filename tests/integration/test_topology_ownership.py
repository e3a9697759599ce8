"""The cloud owns the JetStream topology: bridges and the API only check it.

(The 3-node version, replicas staying at 3 across API and bridge restarts, is in
``tests/chaos/test_topology_cluster.py``.)
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import nats
import pytest
import structlog

from broker.errors import TopologyMissing
from broker.protocol.commands import generate_key_pair
from broker.protocol.topology import INIT_HINT, Topology
from broker.runtime.embedded_nats import EmbeddedNats
from broker.settings import ApiSettings, NatsSettings
from cloud_ingest.api import Api
from edge_bridge.bridge import Bridge
from edge_bridge.sdk import EdgeClient
from tests.helpers import until
from tests.integration.harness import (
    bridge_settings,
    init_topology,
    running_ingest,
    serving,
    wait_for_records,
)

OWNER = {"records_max_age_s": 3 * 24 * 3600.0, "duplicate_window_s": 120.0}
"""A configuration no client's defaults match, so any rewrite shows."""


async def stream_configs(url: str) -> dict[str, tuple[float | None, float | None, int | None]]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        out = {}
        for name in ("ES_RECORDS", "ES_CONTROL", "ES_EVENTS"):
            c = (await js.stream_info(name)).config
            out[name] = (c.max_age, c.duplicate_window, c.num_replicas)
        return out
    finally:
        await nc.close()


def shipped(bridge: Bridge, stream: str) -> int:
    state = bridge.buffer.stream_state(stream)
    return 0 if state is None else state.shipped_seq


async def test_a_bridge_start_leaves_the_owners_stream_config_alone(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    """Streams made by the owner with non-default settings keep them while a bridge
    (with its own, default, settings) connects, ships and reconnects."""
    await init_topology(nats_server.url, **OWNER)
    before = await stream_configs(nats_server.url)
    settings = bridge_settings(tmp_path)
    bridge = Bridge(settings, NatsSettings(url=nats_server.url, publish_timeout_s=2))
    async with serving(bridge):
        async with EdgeClient(bridge.url) as client:
            await client.publish("s", {"n": 1})
            await client.flush()
        await until(lambda: shipped(bridge, "s") >= 1, timeout=15, message="nothing shipped")
        await nats_server.restart()  # a reconnect is another chance to "fix" the streams
        await until(lambda: bridge.nats_connected, timeout=15)
        await bridge.send_heartbeat()
    assert await stream_configs(nats_server.url) == before


async def test_a_bridge_waits_for_missing_streams_and_never_creates_them(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """With no streams, a bridge accepts records but creates nothing and says why it
    waits; once the ingest has created the topology the records flow."""
    bridge = Bridge(bridge_settings(tmp_path), NatsSettings(url=nats_server.url,
                                                            publish_timeout_s=2))

    with structlog.testing.capture_logs() as logs:

        def waits() -> list[dict[str, Any]]:
            return [e for e in logs if e["event"] == "streams_not_ready"]

        async with serving(bridge):
            async with EdgeClient(bridge.url) as client:
                futures = [client.publish("s", {"n": i}) for i in range(10)]
                await client.flush()
                assert all(f.result().seq for f in futures)
            await until(lambda: bridge.nats_connected, timeout=15)
            # Several rounds of the bridge's check, each saying what to run; none creates.
            await until(lambda: len(waits()) >= 2, timeout=15,
                        message="the bridge never said it waits for the streams")
            assert all(INIT_HINT in e["error"] for e in waits()), waits()
            nc = await nats.connect(nats_server.url)
            try:
                js = nc.jetstream()
                assert await Topology().missing_streams(
                    js, ["ES_RECORDS", "ES_CONTROL", "ES_EVENTS"]) == [
                    "ES_RECORDS", "ES_CONTROL", "ES_EVENTS"]
            finally:
                await nc.close()
            async with running_ingest(pg_dsn, nats_server.url):
                await wait_for_records(pg_dsn, 10, timeout=30)


async def test_the_api_refuses_to_start_without_streams_and_names_the_fix(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """The API does not create ES_CONTROL; it fails at start with the missing stream
    and what to run."""
    private_key, _ = generate_key_pair(tmp_path / "keys")
    api = Api(ApiSettings(postgres_dsn=pg_dsn, port=0, private_key_file=private_key,
                          operator_token=secrets.token_urlsafe(32)),
              NatsSettings(url=nats_server.url))
    with pytest.raises(TopologyMissing) as raised:
        async with api:
            pass
    assert raised.value.missing == ["ES_CONTROL"]
    assert "edgesync streams init" in str(raised.value)


async def test_streams_check_reports_and_streams_init_creates(
    nats_server: EmbeddedNats,
) -> None:
    """`edgesync streams check` exits 1 while streams are missing; `streams init`
    creates them and the bucket; then `check` exits 0."""
    env = {**os.environ, "EDGESYNC_NATS__URL": nats_server.url, "COLUMNS": "200"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "broker", "streams", *args],
                              capture_output=True, text=True, timeout=60, env=env,
                              check=False)

    missing = await asyncio.to_thread(cli, "check")
    assert missing.returncode == 1, missing.stdout + missing.stderr
    created = await asyncio.to_thread(cli, "init")
    assert created.returncode == 0, created.stdout + created.stderr
    ok = await asyncio.to_thread(cli, "check")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "KV_ES_WATERMARKS" in ok.stdout
