"""The ingest's topology keeper (:mod:`cloud_ingest.topology_keeping`) against a real
JetStream: a repair that fails half-way is tried again by the keeper itself (nothing
else may fail to ask again), and a shutdown does not wait for a check in progress."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError

from broker.protocol.topology import Topology
from broker.runtime.embedded_nats import EmbeddedNats
from cloud_ingest.metrics import IngestMetrics
from cloud_ingest.topology_keeping import TopologyKeeper
from tests.support import until

T = Topology()
DURABLE = "keeper-test"


@pytest.fixture
async def js(nats_server: EmbeddedNats) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_server.url)
    try:
        context = nc.jetstream(timeout=5)
        await T.ensure_all(context)
        yield context
    finally:
        await nc.close()


async def _has_consumer(js: JetStreamContext) -> bool:
    try:
        await js.consumer_info(T.records_stream, DURABLE)
    except NotFoundError:
        return False
    return True


async def test_a_repair_that_fails_is_tried_again_without_another_failure(
    js: JetStreamContext,
) -> None:
    calls = 0

    async def ensure() -> None:  # refused once (e.g. NATS timed out), then made
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TimeoutError("refused once")
        await js.add_consumer(T.records_stream, ConsumerConfig(durable_name=DURABLE))

    keeper = TopologyKeeper(js, T, consumers=[(T.records_stream, DURABLE, ensure)],
                            metrics=IngestMetrics(), min_interval_s=0.05)
    keeping = asyncio.create_task(keeper.keep_forever())
    try:
        keeper.suspect()  # once: no worker fails again to ask
        await until(lambda: calls >= 1, timeout=10, message="never checked")
        await until(lambda: keeper.ok and keeper.repairs == 1, timeout=10,
                    message=f"not repaired after a failed try (calls={calls})")
        assert calls == 2
        assert await _has_consumer(js)
    finally:
        keeper.begin_shutdown()
        await asyncio.wait_for(keeping, 5)


async def test_shutdown_cancels_a_check_in_progress(js: JetStreamContext) -> None:
    entered = asyncio.Event()

    async def ensure() -> None:  # a JetStream request that does not come back
        entered.set()
        await asyncio.Event().wait()

    keeper = TopologyKeeper(js, T, consumers=[(T.records_stream, DURABLE, ensure)],
                            metrics=IngestMetrics())
    keeping = asyncio.create_task(keeper.keep_forever())
    keeper.suspect()
    await asyncio.wait_for(entered.wait(), 10)
    keeper.begin_shutdown()
    await asyncio.wait_for(keeping, 5)  # not held by the check
    assert not keeper.ok
