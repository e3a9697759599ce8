"""How a client's batches settle: every record acknowledged or failed, exactly once.

:class:`BatchBook` keeps a client's batches (pending per stream, and sealed
but unsettled), the count of records not yet settled, and the failures of
records sent without a future (``send``) since the last ``flush``. It is the
:class:`~edge_bridge.sdk._delivery.Settler` the senders report outcomes to:
:meth:`BatchBook.resolve` gives each waiting record its identity,
:meth:`BatchBook.fail` fails a batch and logs it once (``sdk_batch_failed``),
whatever the number of records. A batch's records without a waiter cost
nothing to settle but their count.
"""

from __future__ import annotations

from collections.abc import Callable

from broker.errors import ClosedError
from broker.protocol.ingress import IngressResponse
from edge_bridge.sdk._batch import OutgoingBatch, fail_waiters, resolve_waiters
from edge_bridge.sdk._log import LOGGER_NAME, EventLogger
from edge_bridge.sdk.results import ClientStats, SendFailed

__all__ = ["BatchBook"]

_log = EventLogger(LOGGER_NAME)


class BatchBook:
    """The batches of one client and how they settle (loop thread only)."""

    def __init__(self, *, producer: str, stats: ClientStats) -> None:
        self.stats = stats
        self._producer = producer
        self._pending: dict[str, OutgoingBatch] = {}
        """Each stream's open batch."""
        self._unresolved: set[OutgoingBatch] = set()
        """Sealed batches not settled yet."""
        self._outstanding = 0
        self._outstanding_bytes = 0
        """Bytes (as batches are sized) of the records published but not yet settled."""
        self._send_failed: dict[str, int] = {}
        self._first_send_error: BaseException | None = None

    @property
    def outstanding(self) -> int:
        """Records published but not yet settled."""
        return self._outstanding

    def resolve(self, batch: OutgoingBatch, ack: IngressResponse) -> None:
        """The bridge stored the batch: each waiting record gets its identity."""
        if batch.settled:
            return
        resolve_waiters(batch.waiters, batch.stream, ack.epoch, ack.first_seq, batch.gaps)
        self.stats.records_acked += batch.count
        self._settle(batch)

    def fail(self, batch: OutgoingBatch, make_error: Callable[[], BaseException]) -> None:
        """Fail every record of ``batch`` and log it once (``sdk_batch_failed``)."""
        if batch.settled:
            return
        error = make_error()
        _log.error(
            "sdk_batch_failed",
            **batch.log_fields(self._producer),
            records_without_future=batch.unwaited,
            error_type=type(error).__name__,
            error=str(error),
        )
        self._fail_quietly(batch, make_error, error)

    def _fail_unacknowledged(self, waited_s: float, why: str) -> None:
        """``close`` timed out: fail what is left as ``not_acknowledged``, log it once."""
        message = (
            f"the bridge did not acknowledge this record within the close timeout "
            f"({waited_s:g} s; {why}); the client closed, and the record may or may not "
            "be stored"
        )
        records = self._fail_all(lambda: ClosedError(message, code="not_acknowledged"))
        self.stats.records_unacknowledged += records
        _log.warning(
            "sdk_records_unacknowledged",
            producer=self._producer,
            records=records,
            close_timeout_s=waited_s,
            reason=why,
        )

    def _fail_all(self, make_error: Callable[[], BaseException]) -> int:
        """Fail every unsettled record (pending and sealed) quietly; returns how many.

        The caller logs one line for all of them, not one per batch.
        """
        records = 0
        for batch in [*self._pending.values(), *self._unresolved]:
            if not batch.settled:
                records += batch.count
                self._fail_quietly(batch, make_error, make_error())
        return records

    def _fail_quietly(self, batch: OutgoingBatch, make_error: Callable[[], BaseException],
                      error: BaseException) -> None:
        """Fail the batch's records; ``error`` is one instance of what they fail with."""
        fail_waiters(batch.waiters, make_error)
        reason = str(getattr(error, "code", type(error).__name__))
        self._count_failed(batch.count, batch.unwaited, reason, error)
        self._settle(batch)

    def _count_failed(self, records: int, sent: int, reason: str,
                      error: BaseException) -> None:
        """Count ``records`` failures (``sent`` of them from ``send``) under ``reason``."""
        stats = self.stats
        stats.records_failed += records
        stats.failed_by_reason[reason] = stats.failed_by_reason.get(reason, 0) + records
        if sent:
            stats.sent_records_failed += sent
            self._send_failed[reason] = self._send_failed.get(reason, 0) + sent
            if self._first_send_error is None:
                self._first_send_error = error

    def _raise_send_failures(self) -> None:
        """Raise :class:`SendFailed` for ``send`` records failed since the last call, once.

        Raises:
            SendFailed: some did.
        """
        error, self._first_send_error = self._first_send_error, None
        by_reason, self._send_failed = self._send_failed, {}
        if error is not None:
            raise SendFailed(sum(by_reason.values()), by_reason, error) from error

    def _settle(self, batch: OutgoingBatch) -> None:
        batch.settled = True
        self._outstanding -= batch.count
        self._outstanding_bytes -= batch.nbytes
        batch.waiters = []
        batch.unwaited = 0
        batch.gaps = None
        batch.records = []
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        if self._pending.get(batch.stream) is batch:
            del self._pending[batch.stream]
        self._unresolved.discard(batch)
        if batch.done is not None and not batch.done.done():
            batch.done.set_result(None)
