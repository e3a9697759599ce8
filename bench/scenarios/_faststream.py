"""The framework baseline: the ingest job as a FastStream user would write it.

Imported only when FastStream is installed (the ``bench`` extra). The
subscriber pulls batches of JSON-per-record messages from a JetStream stream
and writes each batch with asyncpg ``executemany`` of ``INSERT ... ON CONFLICT
DO NOTHING``; FastStream acknowledges the batch after the handler returns.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import asyncpg
import msgspec
from faststream import Context
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.message import NatsBatchMessage
from nats.js.api import DeliverPolicy

from cloud_ingest.ingesting import init_connection

__all__ = ["consume"]

_INSERT = (
    "INSERT INTO records (stream_key, seq, event_time, received_at, key, payload) "
    "VALUES (es_stream_key($1, $2, $3), $4, $5, $6, $7, $8)"
)
_json = msgspec.json.Encoder()


async def consume(url: str, dsn: str, *, stream: str, subject: str, records: int,
                  batch: int) -> float:
    """Consume ``records`` messages into ``dsn``; returns the seconds it took."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, init=init_connection)
    assert pool is not None
    broker = NatsBroker(url, logger=None)
    done = asyncio.Event()
    written = 0

    async def handle(
        bodies: list[dict[str, Any]],
        message: Annotated[NatsBatchMessage, Context("message")],
    ) -> None:
        nonlocal written
        now_us = time.time_ns() // 1000
        rows = []
        for body, raw in zip(bodies, message.raw_message, strict=True):
            _, _, edge, stream_name = raw.subject.split(".")
            rows.append((edge, stream_name, body["epoch"], body["seq"], body["ts"], now_us,
                         body.get("key"), _json.encode(body["payload"])))
        await pool.executemany(_INSERT, rows)
        written += len(rows)
        if written >= records:
            done.set()

    # Called, not used as a decorator: mypy checks this module also where FastStream
    # is not installed (CI), and an untyped decorator would make the handler untyped.
    broker.subscriber(
        subject,
        stream=JStream(stream, declare=False),
        durable="framework",
        deliver_policy=DeliverPolicy.ALL,
        pull_sub=PullSub(batch_size=batch, timeout=0.5, batch=True),
    )(handle)

    started = time.perf_counter()
    try:
        await broker.start()
        await asyncio.wait_for(done.wait(), timeout=600)
        seconds = time.perf_counter() - started
    finally:
        await broker.stop()
        await pool.close()
    return seconds
