"""What the SDK hands back: a record's identity at the bridge, the client's counters,
and the error that reports records sent fire-and-forget (``send``) that failed."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from broker.errors import EdgesyncError

__all__ = ["ClientStats", "RecordAck", "SendFailed"]


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
    """Records accepted by ``publish`` or ``send``."""
    records_sent: int = 0
    """Of those, records accepted by ``send`` (fire-and-forget, no future)."""
    records_acked: int = 0
    """Records the bridge confirmed durable."""
    records_failed: int = 0
    """Records that failed (rejected, timed out, or aborted by close): a ``publish``
    record through its future, a ``send`` record through ``flush``/``close``."""
    sent_records_failed: int = 0
    """Of those, records accepted by ``send`` (also in ``records_failed``)."""
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    """``records_failed`` by the failure's ``code`` (``invalid_input``,
    ``record_too_large``, ``buffer_full``, ``unavailable``, ``shutting_down``,
    ``not_acknowledged``, ...)."""
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


class SendFailed(EdgesyncError):
    """Records sent with ``send`` (no future each) failed since the last ``flush``.

    Raised by ``flush`` once every record is settled, and by ``close`` once the
    client is closed, so a fire-and-forget application learns of every failure
    at the point it waits anyway. Each failure is reported once: the counts
    start again from zero after this is raised. Every failed batch was also
    logged when it failed (``sdk_batch_failed``, or one ``sdk_records_aborted``
    / ``sdk_records_unacknowledged`` line at close).

    Attributes:
        records: how many ``send`` records failed.
        by_reason: those records by the failure's ``code`` (see
            :attr:`ClientStats.failed_by_reason`).
        first_error: the first failure's error (also this exception's ``__cause__``).
    """

    default_code = "send_failed"

    def __init__(self, records: int, by_reason: dict[str, int],
                 first_error: BaseException) -> None:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(by_reason.items()))
        super().__init__(
            f"{records} records sent with send() failed ({reasons}); first: "
            f"{type(first_error).__name__}: {first_error}")
        self.records = records
        self.by_reason = by_reason
        self.first_error = first_error
