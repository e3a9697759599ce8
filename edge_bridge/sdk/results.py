"""What the SDK hands back: a record's identity at the bridge, and the client's counters."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

__all__ = ["ClientStats", "RecordAck"]


class RecordAck(msgspec.Struct, frozen=True, gc=False):
    """A record's identity at the bridge, returned once the record is durable there."""

    stream: str
    epoch: int
    """Random id of the stream's buffer incarnation (a wiped buffer gets a new one)."""
    seq: int
    """Dense, increasing position of the record in ``(stream, epoch)``."""


@dataclass(slots=True)
class ClientStats:
    """Counters since the client was created (monotonic; read them, do not write)."""

    records_published: int = 0
    """Records accepted by ``publish``."""
    records_acked: int = 0
    """Records the bridge confirmed durable."""
    records_failed: int = 0
    """Records whose future failed (rejected, timed out, or aborted by close)."""
    requests_sent: int = 0
    """HTTP requests attempted, retries included."""
    retries: int = 0
    """Attempts beyond the first of each request."""
    outages: int = 0
    """Times the bridge stopped accepting requests (unreachable, 5xx, or full) after
    it had been accepting them; each is logged once (``sdk_bridge_unavailable``)
    and its end once (``sdk_bridge_available``)."""
    records_unacknowledged: int = 0
    """Records failed by ``close`` after its timeout (also in ``records_failed``):
    the bridge had not acknowledged them, so they may or may not be stored."""
