"""Messages the edge sends on ``<prefix>.evt.<edge>``: heartbeats, drop markers,
command status reports and desired-state reports. MessagePack maps tagged by ``type``
so new kinds can be added without breaking old readers."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from broker.errors import DecodeError
from broker.protocol.tokens import TOKEN_PATTERN
from broker.protocol.wire import MAX_EPOCH, MAX_SEQ

__all__ = [
    "CommandStatusReport",
    "DesiredStateReport",
    "DropMarker",
    "Event",
    "Heartbeat",
    "StreamHealth",
    "decode_event",
    "encode_event",
]


_Token = Annotated[str, msgspec.Meta(pattern=rf"\A{TOKEN_PATTERN}\Z")]
"""An edge id or stream name (:mod:`broker.protocol.tokens`). The cloud turns what an
event names into subjects (a watermark key ``<edge>.<stream>.<epoch>``) and rows, so an
event naming anything else is malformed: a stream name with a space, once merged into
``committed_ranges``, made every watermark write of its window fail, for every edge."""
_Epoch = Annotated[int, msgspec.Meta(ge=1, le=MAX_EPOCH)]
"""A buffer's epoch as the wire allows it."""


class StreamHealth(msgspec.Struct, frozen=True):
    epoch: _Epoch
    next_seq: int
    """One past the highest seq assigned."""
    shipped_seq: int
    committed_seq: int
    records: int
    bytes: int
    dropped_overflow: int
    dropped_ttl: int
    oldest_uncommitted_age_s: float = 0.0
    """Age of the oldest record not yet committed in PostgreSQL (the lag)."""
    trim_floor: int = 0
    """Every seq up to it was deleted from the buffer because the cloud had committed
    it (or accounted for it as dropped): the highest committed watermark the edge
    applied, kept in the buffer file. Whatever below it the cloud no longer holds
    is *lost after commit* (:mod:`cloud_ingest.reconciling`)."""


class Heartbeat(msgspec.Struct, tag="heartbeat", tag_field="type", frozen=True):
    """The bridge's periodic health report."""

    edge: _Token
    version: str
    sent_at: float
    """Unix seconds, the edge's clock."""
    buffer_records: int
    buffer_bytes: int
    buffer_max_bytes: int
    unshipped_records: int
    oldest_unshipped_age_s: float
    disk_bytes: int
    dropped: dict[str, dict[str, int]]
    """``{stream: {"overflow": n, "ttl": m}}`` since the buffer was created."""
    streams: dict[_Token, StreamHealth] = {}


_Seq = Annotated[int, msgspec.Meta(ge=1, le=MAX_SEQ)]
"""A record seq as the wire allows it (a drop marker's range is of records' seqs)."""


class DropMarker(msgspec.Struct, tag="drop", tag_field="type", frozen=True):
    """The edge dropped a contiguous run of records by policy (reported once per run)."""

    edge: _Token
    stream: _Token
    epoch: _Epoch
    first_seq: _Seq
    last_seq: _Seq
    count: Annotated[int, msgspec.Meta(ge=0)]
    reason: str
    """``overflow`` or ``ttl`` (policy), or ``damaged`` (lost with a damaged buffer file,
    counted when it was salvaged)."""
    dropped_at: float
    """Unix seconds, the edge's clock."""

    def __post_init__(self) -> None:
        if self.last_seq < self.first_seq:  # decoding: a ValidationError, so malformed
            raise ValueError(f"drop range {self.first_seq}..{self.last_seq} is reversed")
        if self.count > self.last_seq - self.first_seq + 1:
            # No run drops more records than its seqs: 2**62 from one edge made the
            # analytics view's dropped counts overflow bigint (v_completeness failed).
            raise ValueError(f"drop count {self.count} exceeds the run "
                             f"{self.first_seq}..{self.last_seq}")


class CommandStatusReport(msgspec.Struct, tag="command_status", tag_field="type", frozen=True):
    """Where one control command stands at the edge (``delivered``, then ``applied``,
    ``failed``, ``rejected`` or ``expired``: a
    :class:`~broker.protocol.commands.CommandStatus`); see :mod:`edge_bridge.commanding`."""

    edge: _Token
    command_id: str
    """The id the command carries (claimed, for commands that failed verification)."""
    digest: str
    """SHA-256 hex of the signed payload; the cloud only updates the command it names."""
    status: str
    """A :class:`~broker.protocol.commands.CommandStatus` value; kept a plain string so a
    status this reader does not know is stored and ignored, not dead-lettered."""
    reported_at: float
    """Unix seconds, the edge's clock."""
    code: str = ""
    """Machine-readable reason of a refusal (``bad_signature``, ``not_allowed``, ...)."""
    reason: str = ""
    result: dict[str, Any] | None = None
    """What an applied command achieved, e.g. ``{"replicas": 3}``."""


class DesiredStateReport(msgspec.Struct, tag="desired_state", tag_field="type", frozen=True):
    """Where an edge stands against its desired state (:mod:`edge_bridge.desired_state`):
    sent after each change of status or drift, and after every apply."""

    edge: _Token
    revision: int
    """The revision of the signed desired state this is about (0: none received)."""
    version_id: int
    digest: str
    """SHA-256 hex of that message's signed payload; the cloud only counts reports that
    carry the digest it issued."""
    status: str
    """One of :data:`broker.protocol.desired.DESIRED_STATUSES` (a plain string, as for
    command status)."""
    reported_at: float
    """Unix seconds, the edge's clock."""
    observed: dict[str, Any] = {}
    """The managed fields as the edge sees them (the reported state)."""
    drift: list[dict[str, Any]] = []
    """``{"path", "desired", "observed"}`` per field that differs."""
    reason: str = ""
    applied: list[str] = []
    """The command kinds the last apply used (empty when nothing differed)."""


Event = Heartbeat | DropMarker | CommandStatusReport | DesiredStateReport

_decoder: msgspec.msgpack.Decoder[Event] = msgspec.msgpack.Decoder(Event)
_encoder = msgspec.msgpack.Encoder()


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> Event:
    """Decode one event.

    Raises:
        DecodeError: the bytes are not a known event.
    """
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"malformed event: {exc}") from exc
    except Exception as exc:
        raise DecodeError(f"malformed event: {type(exc).__name__}: {exc}") from exc
