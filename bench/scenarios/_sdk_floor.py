"""The floor under the SDK's CPU per record: what any Python client must do per record.

Whatever a Python client does around it, each record an application hands over
as a ``dict`` has to be encoded to JSON (the bridge stores JSON), stamped with
its event time and kept until its request is written. This module times exactly
that (``msgspec``'s JSON encoder; ``time.time_ns``; a tuple appended to a list
cut every 1,000 records) on the scenario's own payloads, beside
``EdgeClient.send`` of the same records with no I/O in the timed loop (the loop is
never yielded to, so its sealed batches wait; they are answered afterwards, untimed,
by an in-process ``httpx.MockTransport``), in the driver's thread, with no bridge
running. The
edge-path scenario prints both beside the SDK's CPU per record under load, so the
gap between the SDK and the floor, and between quiet and loaded, are measured in
the same run.
"""

from __future__ import annotations

import statistics
import time
from typing import Final

import httpx
import msgspec

from bench.data import STREAM, Pool
from edge_bridge.sdk import EdgeClient

__all__ = ["SdkFloor", "sdk_floor"]

_ROUNDS: Final = 3
_CUT: Final = 1_000


class SdkFloor(msgspec.Struct, frozen=True):
    """CPU µs per record, medians of alternating rounds (thread CPU time)."""

    encode_us: float
    """JSON encoding alone."""
    floor_us: float
    """JSON encoding + event time + kept in a list: the floor."""
    send_us: float
    """``EdgeClient.send`` of the same records, no I/O."""


def _encode(pool: Pool, n: int) -> float:
    encode = msgspec.json.Encoder().encode
    dicts = pool.dicts
    size = len(dicts)
    started = time.thread_time()
    for i in range(n):
        encode(dicts[i % size])
    return (time.thread_time() - started) / n * 1e6


def _floor(pool: Pool, n: int) -> float:
    encode = msgspec.json.Encoder().encode
    now = time.time_ns
    dicts, keys = pool.dicts, pool.keys
    size = len(dicts)
    kept: list[tuple[int, int, bytes, str | None, None]] = []
    started = time.thread_time()
    for i in range(n):
        j = i % size
        kept.append((now() // 1000, 1, encode(dicts[j]), keys[j], None))
        if len(kept) >= _CUT:
            kept = []
    return (time.thread_time() - started) / n * 1e6


class _Request(msgspec.Struct):
    producer: str
    request_seq: int
    records: list[msgspec.Raw]


class _Acceptor:
    """A bridge that stores nothing, in process: the answer a stored request gets."""

    def __init__(self) -> None:
        self._next_seq = 1
        self._decode = msgspec.msgpack.Decoder(_Request).decode

    def __call__(self, request: httpx.Request) -> httpx.Response:
        first, count = self._next_seq, len(self._decode(request.content).records)
        self._next_seq += count
        return httpx.Response(200, json={"epoch": 1, "epoch_str": "1", "first_seq": first,
                                         "count": count, "duplicate": False})


async def _send(pool: Pool, n: int) -> float:
    client = EdgeClient(transport=httpx.MockTransport(_Acceptor()), max_pending_records=n + 1)
    dicts, keys = pool.dicts, pool.keys
    size = len(dicts)
    async with client:
        send = client.send
        started = time.thread_time()
        for i in range(n):
            j = i % size
            send(STREAM, dicts[j], key=keys[j])
        seconds = time.thread_time() - started
    return seconds / n * 1e6


async def sdk_floor(pool: Pool, n: int) -> SdkFloor:
    """The floor and ``send`` without I/O on ``n`` records (module docstring)."""
    encodes, floors, sends = [], [], []
    for _ in range(_ROUNDS):
        encodes.append(_encode(pool, n))
        floors.append(_floor(pool, n))
        sends.append(await _send(pool, n))
    return SdkFloor(statistics.median(encodes), statistics.median(floors),
                    statistics.median(sends))
