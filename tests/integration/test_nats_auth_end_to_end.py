"""The real services under their own NATS identities, over TLS: the allowed paths
end to end, and an edge cut off by `revoke`.

The permission matrix (``test_nats_permissions``) proves each subject one by one;
this proves the services themselves need nothing more: a bridge ships records the
ingest commits, follows the committed watermark and trims, takes a command from
the API and reports it applied; and then `edges revoke` cuts that bridge off.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from broker.connecting import connect_options
from broker.protocol.commands import generate_key_pair
from broker.runtime.secured_nats import SecuredNats, create_control_consumer
from broker.settings import ApiSettings, ControlSettings, IngestSettings
from cloud_ingest.api import Api
from cloud_ingest.service import Ingest
from edge_bridge.bridge import Bridge
from tests.helpers import until
from tests.integration.harness import bridge_settings, serving, wait_for_records
from tests.integration.test_end_to_end_ack import publish

TOKEN = "e2e-operator-Qm7vX2pLr9TzK4wN8bYc3HdF6jS1"  # a bootstrap token must be strong


async def test_services_work_end_to_end_under_their_own_identities(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Bridge, ingest and API each with their own nkey over TLS: records reach
    PostgreSQL, the edge trims on the committed watermark, and a command is applied."""
    private_key, public_key = generate_key_pair(tmp_path / "keys")
    async with SecuredNats(tmp_path / "state", log_file=tmp_path / "nats.log") as secured:
        secured.identities.add_edge("edge-1")
        await secured.server.reload()
        ingest = Ingest(IngestSettings(postgres_dsn=pg_dsn, port=0, fetch_timeout_s=0.05),
                        secured.settings_for("ingest"))
        api = Api(ApiSettings(postgres_dsn=pg_dsn, port=0, private_key_file=private_key,
                              operator_token=TOKEN, republish_interval_s=0.5),
                  secured.settings_for("api"))
        async with serving(ingest), serving(api):
            await create_control_consumer(secured.settings_for("admin"), secured.topology,
                                          "edge-1", ack_wait_s=2.0)
            settings = bridge_settings(tmp_path, "edge-1", heartbeat_interval_s=0.1,
                                       control=ControlSettings(public_key_file=public_key,
                                                               ack_wait_s=2.0))
            bridge = Bridge(settings, secured.settings_for("edge", "edge-1",
                                                           publish_timeout_s=2))
            async with serving(bridge):
                await publish(bridge.url, "s", 500)
                await wait_for_records(pg_dsn, 500)

                async def trimmed() -> bool:
                    return (await bridge.buffer.stats()).records == 0

                await until(trimmed, timeout=20, message="watermark never reached the edge")

                async with httpx.AsyncClient(base_url=api.url, timeout=10, headers={
                        "Authorization": f"Bearer {TOKEN}"}) as http:
                    async def known() -> bool:
                        edges = (await http.get("/v1/edges")).json()
                        return any(e["edge"] == "edge-1" for e in edges)

                    await until(known, timeout=15, message="heartbeat never arrived")
                    response = await http.post("/v1/edges/edge-1/commands", json={
                        "kind": "bridge.configure", "spec": {"batch_max_records": 10}})
                    assert response.status_code == 202, response.text
                    command_id = response.json()["id"]

                    async def applied() -> dict[str, Any] | None:
                        got: dict[str, Any] = (await http.get(f"/v1/commands/{command_id}")
                                               ).json()
                        return got if got["status"] == "applied" else None

                    done = await until(applied, timeout=20, message="command never applied")
                assert done["result"]["batch_max_records"] == 10


async def test_revoked_edge_is_cut_off(tmp_path: Path) -> None:
    """`revoke` reloads the server: the edge's open connection is closed and a new
    connection with its credentials is refused; other edges are untouched."""
    async with SecuredNats(tmp_path / "state", log_file=tmp_path / "nats.log") as secured:
        doomed = await secured.add_edge("e1", control_consumer=False)
        kept = await secured.add_edge("e2", control_consumer=False)
        closed = asyncio.Event()

        async def on_disconnect() -> None:
            closed.set()

        nc = await nats.connect(secured.url, allow_reconnect=False, connect_timeout=3,
                                disconnected_cb=on_disconnect, **connect_options(doomed))
        other = await nats.connect(secured.url, allow_reconnect=False, connect_timeout=3,
                                   **connect_options(kept))
        try:
            creds = doomed.credentials_file
            assert creds is not None
            saved = creds.read_bytes()
            assert await secured.revoke_edge("e1")
            assert not creds.exists()  # the seed is gone from the cloud side
            await asyncio.wait_for(closed.wait(), 10)
            creds.write_bytes(saved)  # the edge still holds its copy: it must not help
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await nats.connect(secured.url, allow_reconnect=False, connect_timeout=3,
                                   **connect_options(doomed))
            assert other.is_connected
            await other.publish("es.evt.e2", b"still here")
            await other.flush(timeout=3)
        finally:
            await nc.close()
            await other.close()
