"""Scenario 6: bytes on the wire per record.

Computed, not sniffed: for the same records, the bytes one NATS ``HPUB``
carries (protocol line, headers with ``Nats-Msg-Id``, body) divided by the
records it carries:

- *JSON per message*: one record per message (:func:`bench.data.json_message`);
- *edgesync batch*: the shipper's batches (2,000 records or 512 KiB),
  uncompressed and zstd-compressed at the shipper's default level.

The reply subject of a JetStream publish is counted at nats-py's length
(``_INBOX.`` + 22-character NUID + ``.`` + 22-character token); the server's
publish acks, one per message, are not counted, which flatters the
JSON-per-message baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from bench.data import EDGE, STREAM, Pool, batches, json_message, json_msg_id
from bench.env import BenchEnv
from bench.profiles import Profile
from bench.results import ScenarioResult
from broker.protocol.topology import Topology
from broker.protocol.wire import encode_batch, msg_id
from broker.settings import ShipperSettings

__all__ = ["KEY", "REPLY_LEN", "TITLE", "hpub_bytes", "run"]

KEY: Final = "wire"
TITLE: Final = "6. bytes on the wire per record"
REPLY_LEN: Final = len("_INBOX.") + 22 + 1 + 22


def hpub_bytes(subject: str, headers: dict[str, str], body_len: int) -> int:
    """Bytes of one ``HPUB subject reply hdr_len total_len\\r\\n<hdr><body>\\r\\n``."""
    hdr = "NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    hdr_len = len(hdr.encode())
    line = f"HPUB {subject} {'x' * REPLY_LEN} {hdr_len} {hdr_len + body_len}\r\n"
    return len(line) + hdr_len + body_len + 2


async def run(env: BenchEnv, profile: Profile, pool: Pool,
              step: Callable[[str], None]) -> ScenarioResult:
    res = ScenarioResult(KEY, TITLE)
    n = profile.wire_records
    step(f"encoding {n:,} records three ways")
    subject = Topology().records_subject(EDGE, STREAM)
    json_subject = f"bench.json.{EDGE}.{STREAM}"
    json_total = json_body = 0
    for seq, rec in enumerate(pool.records(n), 1):
        body = json_message(rec, seq)
        json_body += len(body)
        json_total += hpub_bytes(json_subject, {"Nats-Msg-Id": json_msg_id(seq)}, len(body))
    level = ShipperSettings().zstd_level
    plain_total = plain_body = zstd_total = zstd_body = 0
    wire_batches = batches(pool, n)
    for b in wire_batches:
        ident = {"Nats-Msg-Id": msg_id(b.edge, b.stream, b.epoch, b.first_seq, b.last_seq)}
        body, headers = encode_batch(b)
        plain_body += len(body)
        plain_total += hpub_bytes(subject, {**headers, **ident}, len(body))
        body, headers = encode_batch(b, zstd_level=level)
        zstd_body += len(body)
        zstd_total += hpub_bytes(subject, {**headers, **ident}, len(body))
    payload = sum(len(r.payload) for r in pool.records(n)) / n
    per = {name: total / n for name, total in
           (("json", json_total), ("batch", plain_total), ("zstd", zstd_total))}
    res.add("record payload (JSON text)", payload, "B", "what the application handed over")
    res.add("JSON per message", per["json"], "B",
            f"body {json_body / n:.1f} B + protocol and headers")
    res.add("edgesync batch, uncompressed", per["batch"], "B",
            f"{len(wire_batches)} batches; body {plain_body / n:.1f} B")
    res.add(f"edgesync batch, zstd level {level}", per["zstd"], "B",
            f"body {zstd_body / n:.1f} B")
    ratio_plain = per["batch"] / per["json"]
    ratio = per["zstd"] / per["json"]
    res.add("batch / JSON per message", ratio_plain, "x")
    res.add("zstd batch / JSON per message", ratio, "x")
    res.check("bytes on the wire, zstd", "≤ 0.3 x JSON-per-message", f"{ratio:.3f}x",
              ratio <= 0.3)
    res.data.update(records=n, per_record=per, zstd_level=level, batches=len(wire_batches))
    _ = env
    return res
