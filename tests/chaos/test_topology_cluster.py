"""On a 3-node JetStream cluster, only the owner sets the streams' replicas.

The ingest creates the streams and the watermark bucket with 3 replicas. Bridges
restarted with ``EDGESYNC_NATS__REPLICAS=1`` and an API started with 1 replica
must leave them at 3: they only check that the streams exist.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import nats
import pytest

from broker.protocol.commands import generate_key_pair
from broker.settings import ApiSettings, NatsSettings
from cloud_ingest.api import Api
from tests.chaos.harness import Load
from tests.chaos.test_nats_cluster import ClusteredSystem
from tests.integration.harness import serving

NAMES = ("ES_RECORDS", "ES_CONTROL", "ES_EVENTS", "KV_ES_WATERMARKS")


async def replicas(url: str) -> dict[str, int | None]:
    nc = await nats.connect(url.split(","))
    try:
        js = nc.jetstream()
        return {n: (await js.stream_info(n)).config.num_replicas for n in NAMES}
    finally:
        await nc.close()


async def test_replicas_stay_at_3_across_api_and_bridge_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """R3 streams stay R3 while bridges and the API (configured for R1) restart."""
    monkeypatch.setenv("EDGESYNC_NATS__REPLICAS", "3")  # the ingests: the owner
    system = ClusteredSystem(tmp_path)
    try:
        await system.start()
        assert await replicas(system.nats.url) == dict.fromkeys(NAMES, 3)
        for bridge in system.bridges.values():
            bridge.env = {**bridge.env, "EDGESYNC_NATS__REPLICAS": "1"}
        private_key, _ = generate_key_pair(tmp_path / "keys")
        api_settings = ApiSettings(postgres_dsn=system.dsn, port=0,
                                   private_key_file=private_key,
                                   operator_token=secrets.token_urlsafe(32))
        async with Load(system) as load:
            for round_ in range(2):
                for bridge in system.bridges.values():
                    await bridge.stop()
                    await bridge.start()
                async with serving(Api(api_settings,
                                       NatsSettings(url=system.nats.url, replicas=1))):
                    await load.wait_acked(2_000 * (round_ + 1), timeout=60)
                assert await replicas(system.nats.url) == dict.fromkeys(NAMES, 3)
        recover = await system.quiesce(load, timeout=120)
        outcome = await system.reconcile(
            "3-node JetStream cluster: bridges and API restarted with replicas=1", load,
            recover_s=recover, notes="streams and watermark bucket stayed at 3 replicas",
        )
        assert outcome.lost == 0, outcome
        assert outcome.duplicated == 0, outcome
    finally:
        await system.close()
