"""The durable-append ceiling of the edge path: its storage step alone, nothing around it.

The same records the SDK producers send, cut into the SDK's 1,000-record
requests and encoded into chunks by the bridge's own code
(:func:`edge_bridge.buffer.chunks.encode_chunks`), appended straight into a
fresh buffer file opened with the bridge's own settings (WAL,
``synchronous=FULL``, its schema and page cache): one transaction, hence one
fsync, per request, as an acknowledged request costs the bridge at the least.
Encoding happens before the clock starts; only the appends are timed. No HTTP,
no validation, no group commit (which can only help), no shipping. Its CPU per
record (the appending thread's) is the floor under the bridge's: the storage step
alone, which every acknowledged record costs.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from bench.data import Pool
from edge_bridge.buffer.chunks import encode_chunks
from edge_bridge.buffer.schema import ChunkRow, connect, create_tables, insert_chunks

__all__ = ["REQUEST_RECORDS", "DurableAppend", "durable_append"]

REQUEST_RECORDS = 1_000
"""Records per request: the SDK's default ``batch_max_records``."""


@dataclass(frozen=True, slots=True)
class DurableAppend:
    rps: float
    """Records appended durably per second."""
    cpu_us: float
    """CPU µs per record of the appending thread (SQLite's work; the fsync waits are
    not CPU)."""


async def durable_append(directory: Path, pool: Pool, records: int) -> DurableAppend:
    """The durable append of ``records`` (see the module docstring)."""
    return await asyncio.to_thread(_append, directory, pool, records)


def _append(directory: Path, pool: Pool, records: int) -> DurableAppend:
    directory.mkdir(parents=True, exist_ok=True)
    all_records = list(pool.records(records))
    requests = [encode_chunks(all_records[i:i + REQUEST_RECORDS])
                for i in range(0, records, REQUEST_RECORDS)]
    conn = connect(directory / "buffer.sqlite3", sync_mode="full")
    try:
        create_tables(conn)
        received = time.time_ns() // 1000
        seq = 1
        started = time.perf_counter()
        cpu = time.thread_time()
        for chunks in requests:
            rows = []
            for chunk in chunks:
                rows.append(ChunkRow(1, seq, seq + chunk.records - 1, received, chunk.size,
                                     chunk.body))
                seq += chunk.records
            conn.execute("BEGIN IMMEDIATE")
            insert_chunks(conn, rows)
            conn.execute("COMMIT")
        seconds = time.perf_counter() - started
        cpu = time.thread_time() - cpu
    finally:
        conn.close()
    return DurableAppend(records / seconds, cpu / records * 1e6)
