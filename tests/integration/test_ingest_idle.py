"""An idle ingest waits on one long pull request per worker instead of polling; a
record that arrives meanwhile is committed at once, not when the request expires, and
shutdown does not wait for the request to expire either, nor for any task of the ingest
to time out."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import nats
from nats.aio.msg import Msg

from broker.runtime.embedded_nats import EmbeddedNats
from cloud_ingest.service import DRAIN_S
from edge_bridge.sdk import EdgeClient
from tests.integration.harness import (
    bridge_settings,
    running_bridge,
    running_ingest,
    wait_for_records,
)
from tests.support import until

IDLE_POLL_S = 30.0
"""Far longer than any wait below: a commit before it proves the long poll delivered."""


async def test_an_idle_worker_long_polls_and_commits_what_arrives_at_once(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    requests: list[dict[str, object]] = []

    async def seen(msg: Msg) -> None:
        requests.append(json.loads(msg.data))

    spy = await nats.connect(nats_server.url)
    try:
        await spy.subscribe("$JS.API.CONSUMER.MSG.NEXT.*.ingest", cb=seen)
        async with running_bridge(bridge_settings(tmp_path), nats_server.url) as bridge, \
                contextlib.AsyncExitStack() as ingest:
            await ingest.enter_async_context(running_ingest(
                pg_dsn, nats_server.url, workers=2, idle_poll_s=IDLE_POLL_S,
                fetch_timeout_s=0.02))

            def long_polls() -> int:
                return sum(1 for r in requests if r.get("batch") == 1
                           and int(str(r.get("expires", 0))) > (IDLE_POLL_S - 1) * 1e9)

            await until(lambda: long_polls() >= 2, timeout=10,
                        message=f"each worker waits with one long pull request: {requests}")
            async with EdgeClient(bridge.url, linger_ms=1) as client:
                client.publish("t", {"i": 1})
                await client.flush()
            await wait_for_records(pg_dsn, 1, timeout=10)  # well before the 30 s expiry
            await until(lambda: long_polls() >= 3, timeout=10,
                        message="idle again: the worker that took the record long-polls again")
            # Not held by the 30 s requests, nor by a root task that ignores the shutdown
            # (each then waits out DRAIN_S, as the topology keeper once did).
            await asyncio.wait_for(ingest.aclose(), DRAIN_S - 2)
    finally:
        await spy.close()
