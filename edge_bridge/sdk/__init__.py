"""The edgesync Python SDK: publish records to the local edge bridge.

A record's future resolves once the record is durable in the bridge's buffer;
from there the bridge ships it to the cloud. Example::

    import asyncio

    from edge_bridge.sdk import EdgeClient

    async def main(readings: list[dict[str, float]]) -> None:
        async with EdgeClient("http://127.0.0.1:8787") as client:
            ack = await client.publish_wait("telemetry", {"temp_c": 21.5}, key="sensor-7")
            print(ack.stream, ack.epoch, ack.seq)     # durable at the bridge
            for reading in readings:                  # fire-and-forget, batched
                client.send("telemetry", reading)     # no future: the cheap way
            await client.flush()                      # all durable, or SendFailed

    asyncio.run(main([{"temp_c": 21.0}, {"temp_c": 21.25}]))

Non-asyncio applications use :class:`SyncEdgeClient` the same way, with
``publish(...).result()``, ``send(...)`` from any thread, and
``with SyncEdgeClient(...) as client:``.
"""

from broker.errors import (
    BufferFull,
    ClosedError,
    Forbidden,
    InvalidInput,
    RecordTooLarge,
    TemporaryError,
    Unauthorized,
)
from edge_bridge.sdk.client import EdgeClient
from edge_bridge.sdk.results import ClientStats, RecordAck, SendFailed
from edge_bridge.sdk.sync_client import SyncEdgeClient

__all__ = [
    "BufferFull",
    "ClientStats",
    "ClosedError",
    "EdgeClient",
    "Forbidden",
    "InvalidInput",
    "RecordAck",
    "RecordTooLarge",
    "SendFailed",
    "SyncEdgeClient",
    "TemporaryError",
    "Unauthorized",
]
