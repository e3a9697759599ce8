"""The records every scenario sends, and their shapes on each path.

Synthetic telemetry from :func:`broker.cli.local_run.synthetic_telemetry` (about
180 bytes of JSON: numbers, strings, a nested map and a list), from a fixed
seed. A pool of distinct payloads is generated once and cycled, so that large
scenarios do not spend the driver's CPU on generating data; the pool is larger
than a batch, so no batch repeats a payload (which would flatter compression).

Shapes:

- *SDK*: ``client.publish(stream, payload_dict, key=device)``;
- *edgesync batch*: what the shipper publishes (:func:`batches`), packed by the
  shipper's own limits;
- *JSON per message*: what a hand-written app publishes for one record
  (:func:`json_message`): its identity, event time, key and payload, with the
  edge and stream in the subject and ``Nats-Msg-Id`` set for de-duplication.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from broker.cli.local_run import synthetic_telemetry
from broker.protocol.wire import CT_JSON, WIRE_VERSION, Batch, Record
from broker.settings import ShipperSettings
from edge_bridge.buffer.chunks import STORED_RECORD_OVERHEAD_BYTES

__all__ = [
    "EDGE",
    "EPOCH",
    "POOL_SIZE",
    "SEED",
    "STREAM",
    "JsonRecord",
    "Pool",
    "batches",
    "json_decoder",
    "json_message",
    "json_msg_id",
]

SEED: Final = 20_260_101
EDGE: Final = "edge-1"
STREAM: Final = "telemetry"
EPOCH: Final = 7_000_000_000_000_000_001
"""A fixed epoch for pre-loaded batches (the bridge mints random ones)."""
POOL_SIZE: Final = 16_384

_json = msgspec.json.Encoder()


class JsonRecord(msgspec.Struct, omit_defaults=True):
    """One record as a hand-written app would publish it, one per NATS message."""

    epoch: int
    seq: int
    ts: int
    key: str | None
    payload: msgspec.Raw


@dataclass(frozen=True, slots=True)
class Pool:
    """Distinct synthetic payloads: as dicts (for the SDK) and as JSON bytes."""

    dicts: list[dict[str, Any]]
    encoded: list[bytes]
    keys: list[str]

    @classmethod
    def generate(cls, size: int = POOL_SIZE, seed: int = SEED) -> Pool:
        rng = random.Random(seed)
        dicts = [synthetic_telemetry(rng, i) for i in range(size)]
        return cls(dicts, [_json.encode(d) for d in dicts], [str(d["device"]) for d in dicts])

    def __len__(self) -> int:
        return len(self.dicts)

    def records(self, n: int, *, start_seq: int = 1, ts_us: int | None = None) -> Iterator[Record]:
        """``n`` wire records for seqs ``start_seq..``, cycling the pool."""
        base = time.time_ns() // 1000 if ts_us is None else ts_us
        size = len(self.encoded)
        for i in range(n):
            j = (start_seq - 1 + i) % size
            yield Record(base + i, CT_JSON, self.encoded[j], self.keys[j], None)


def batches(pool: Pool, n: int, *, settings: ShipperSettings | None = None,
            ts_us: int | None = None) -> list[Batch]:
    """``n`` records packed into batches the way the shipper packs them."""
    limits = settings or ShipperSettings()
    out: list[Batch] = []
    current: list[Record] = []
    nbytes = 0
    first = 1
    for seq, rec in enumerate(pool.records(n, ts_us=ts_us), 1):
        size = len(rec.payload) + len(rec.key or "") + STORED_RECORD_OVERHEAD_BYTES
        if current and (len(current) >= limits.batch_max_records
                        or nbytes + size > limits.batch_max_bytes):
            out.append(Batch(WIRE_VERSION, EDGE, STREAM, EPOCH, first, current))
            current, nbytes, first = [], 0, seq
        current.append(rec)
        nbytes += size
    if current:
        out.append(Batch(WIRE_VERSION, EDGE, STREAM, EPOCH, first, current))
    return out


def json_message(rec: Record, seq: int, epoch: int = EPOCH) -> bytes:
    """The JSON-per-message body of one record."""
    return _json.encode(JsonRecord(epoch, seq, rec.ts, rec.key, msgspec.Raw(rec.payload)))


def json_msg_id(seq: int, epoch: int = EPOCH) -> str:
    """``Nats-Msg-Id`` of a JSON-per-message record: its identity."""
    return f"{EDGE}.{STREAM}.{epoch}.{seq}"


json_decoder: Final = msgspec.json.Decoder(JsonRecord)
