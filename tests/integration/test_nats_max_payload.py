"""A record the bridge accepted is never a message nats-server refuses by closing the
connection, and a connection nats-py gives up is made anew.

nats-py checks a message's body against the server's ``max_payload``, while the server
counts headers too: a batch just under the limit reached the server, which closed the
connection, and nats-py gave it up for good (every stream of the bridge stopped until a
restart, and the buffered batch did it again at once). Found by posting a record of
1,048,476 bytes to ``edgesync up``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from annotated_types import Le

from broker.connecting import close_nats, connect_with_retry
from broker.runtime.embedded_nats import EmbeddedNats
from broker.runtime.secured_nats import NATS_MAX_PAYLOAD, SecuredNats
from broker.settings import BridgeSettings, ShipperSettings
from edge_bridge.bridge import Bridge
from edge_bridge.shipping import BATCH_OVERHEAD_BYTES, message_bytes
from tests.integration.harness import (
    bridge_settings,
    running_bridge,
    running_ingest,
    wait_for_records,
)
from tests.support import until

LIMIT = 64 * 1024


@pytest.fixture
async def small_nats(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """A nats-server that takes messages of at most 64 KiB (an operator's own, say)."""
    config = tmp_path / "nats.conf"
    config.write_text(f"max_payload: {LIMIT}\n")
    async with EmbeddedNats(tmp_path / "js", config_file=config) as server:
        yield server


def _records(*payloads: bytes) -> bytes:
    return json.dumps({"records": [
        {"payload_b64": base64.b64encode(p).decode()} for p in payloads]}).encode()


async def _posted(bridge: Bridge, stream: str, *payloads: bytes) -> None:
    async with httpx.AsyncClient(base_url=bridge.url) as http:
        answer = await http.post(f"/v1/streams/{stream}/records", content=_records(*payloads),
                                 headers={"content-type": "application/json"})
    assert answer.status_code == 200, answer.text


def _sample(bridge: Bridge, name: str) -> float:
    value = bridge.metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


async def test_a_batch_over_max_payload_is_held_and_the_connection_and_other_streams_live(
    small_nats: EmbeddedNats, pg_dsn: str, tmp_path: Path
) -> None:
    """A record that makes a bigger message than the server takes (accepted: the bridge's
    limit is 1 MiB) is held back and counted, not sent: the connection stays up, and
    records of other streams, before and after it, commit."""
    settings = bridge_settings(tmp_path, shipper=ShipperSettings(linger_ms=2))
    async with running_ingest(pg_dsn, small_nats.url), \
            running_bridge(settings, small_nats.url) as bridge:
        await until(lambda: bridge.nats_connected, message="bridge never connected")
        await _posted(bridge, "small", b"1")
        await _posted(bridge, "big", bytes(LIMIT - 100))  # body under, headers over
        await until(lambda: _sample(bridge, "edgesync_batches_too_large_total") >= 2,
                    timeout=15, message="the big batch was never held back")
        await _posted(bridge, "small", b"2")
        await wait_for_records(pg_dsn, 2, where="stream = 'small'")
        assert bridge.nats_connected
        assert bridge._nc is not None and bridge._nc.max_payload == LIMIT
        assert _sample(bridge, "edgesync_batches_too_large_total") >= 2
        await wait_for_records(pg_dsn, 0, where="stream = 'big'")


async def test_a_connection_the_server_ends_for_good_is_made_anew(
    small_nats: EmbeddedNats, pg_dsn: str, tmp_path: Path
) -> None:
    """When nats-py gives the bridge's connection up (the server ended it with an error
    it does not retry), the bridge connects anew and its records flow again."""
    settings = bridge_settings(tmp_path, shipper=ShipperSettings(linger_ms=2))
    async with running_ingest(pg_dsn, small_nats.url), \
            running_bridge(settings, small_nats.url) as bridge:
        await until(lambda: bridge.nats_connected, message="bridge never connected")
        first = bridge._nc
        assert first is not None
        # What an oversized batch once did: a message whose headers push it past the
        # server's limit (nats-py checks only the body), which the server answers by
        # closing the connection.
        headers = {"Pad": "x" * 200}
        body = bytes(LIMIT - 100)
        assert len(body) <= LIMIT < message_bytes(body, headers)
        await first.publish("es.nothing", body, headers=headers)
        await until(lambda: first.is_closed, timeout=10,
                    message="the server did not end the connection")
        await until(lambda: bridge._nc is not None and bridge._nc is not first
                    and bridge.nats_connected, timeout=20,
                    message="the bridge never connected anew")
        await _posted(bridge, "s", b"after")
        await wait_for_records(pg_dsn, 1, where="stream = 's'")


async def test_edgesyncs_own_nats_server_takes_a_batch_of_the_largest_record(
    tmp_path: Path
) -> None:
    """``edgesync up``'s nats-server announces a ``max_payload`` that holds a batch of one
    record of the largest ``max_record_bytes`` the bridge's settings allow, with its
    framing (the bound follows the setting's own limit, should that be raised)."""
    async with SecuredNats(tmp_path / "state", log_file=tmp_path / "nats.log") as secured:
        nc = await connect_with_retry(secured.settings_for("admin"), name="max-payload-test")
        try:
            announced = nc.max_payload
        finally:
            await close_nats(nc)
    field = BridgeSettings.model_fields["max_record_bytes"]
    largest_record = next(m.le for m in field.metadata if isinstance(m, Le))
    assert announced == NATS_MAX_PAYLOAD >= largest_record + BATCH_OVERHEAD_BYTES
