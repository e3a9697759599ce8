"""The one exception tree of edgesync.

Every error a caller can act on is one of these; foreign errors (asyncpg, nats,
sqlite3, httpx) are translated at the boundary with ``raise ... from exc`` so
retry-ability is decided once, where the error enters our code.

::

    EdgesyncError
    ├── ConfigError              bad settings; fail at start-up with the field named
    ├── InvalidInput             bad record / stream name / command: 4xx, dead letter
    │   ├── DecodeError          bytes that are not a valid wire message; carries the
    │   │                        batch's identity span when the envelope was readable
    │   ├── InvalidRecords       records the cloud cannot store; carries (index, reason)s
    │   ├── RecordTooLarge       one record above the per-record limit (413)
    │   └── RequestConflict      (producer, request_seq) reused for another request (409)
    ├── BufferFull               back-pressure; carries retry_after (seconds)
    ├── CommandRejected          signature, expiry, replay or policy; carries a code
    ├── ClosedError              a component used after close()
    ├── RuntimeUnavailable       an embedded server cannot be found or started
    └── TemporaryError(delay)    NATS timeout, DB unavailable: retry after delay
"""

from __future__ import annotations

__all__ = [
    "BufferFull",
    "ClosedError",
    "CommandRejected",
    "ConfigError",
    "DecodeError",
    "EdgesyncError",
    "InvalidInput",
    "InvalidRecords",
    "RecordTooLarge",
    "RequestConflict",
    "RuntimeUnavailable",
    "TemporaryError",
]


class EdgesyncError(Exception):
    """Root of every error edgesync raises on purpose."""


class ConfigError(EdgesyncError):
    """Settings are invalid; raised at start-up, naming the field."""


class InvalidInput(EdgesyncError):
    """Input that will never become valid by retrying (a 4xx, a dead letter)."""


class DecodeError(InvalidInput):
    """Bytes that are not a valid wire message; ``str(exc)`` is the reason.

    Attributes:
        span: ``(edge, stream, epoch, first_seq, last_seq)`` the message claims,
            when its envelope was readable and valid (so the seqs can be
            accounted as dead-lettered); ``None`` otherwise.
    """

    def __init__(
        self, message: str, *, span: tuple[str, str, int, int, int] | None = None
    ) -> None:
        super().__init__(message)
        self.span = span


class InvalidRecords(InvalidInput):
    """Records the cloud cannot store (:mod:`broker.protocol.validation`).

    Attributes:
        problems: ``(index, reason)`` of each bad record, in order.
    """

    def __init__(self, problems: list[tuple[int, str]]) -> None:
        shown = "; ".join(f"record {i}: {reason}" for i, reason in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(shown + more)
        self.problems = problems


class RecordTooLarge(InvalidInput):
    """A single record exceeds the per-record size limit."""


class RequestConflict(InvalidInput):
    """A ``(producer, request_seq)`` already stored for a different request."""


class BufferFull(EdgesyncError):
    """The edge buffer is at its byte cap and the stream's policy is ``block``."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CommandRejected(EdgesyncError):
    """A command the edge refuses to act on: signature, expiry, replay or policy.

    Attributes:
        code: a stable machine-readable reason (``bad_signature``, ``unknown_key``,
            ``malformed``, ``non_canonical``, ``wrong_edge``, ``expired``,
            ``not_yet_valid``, ``replay``, ``unknown_kind``, ``invalid_spec``,
            ``not_allowed``).
        command_id: the id the command claims (``""`` when not even that can be read).
        digest: SHA-256 hex of the signed payload (``""`` when there is none).
    """

    def __init__(
        self, code: str, message: str, *, command_id: str = "", digest: str = ""
    ) -> None:
        super().__init__(message)
        self.code = code
        self.command_id = command_id
        self.digest = digest


class ClosedError(EdgesyncError):
    """A component was used after it was closed."""


class RuntimeUnavailable(EdgesyncError):
    """An embedded server (nats-server, PostgreSQL) cannot be found or started."""


class TemporaryError(EdgesyncError):
    """A failure expected to clear by itself; retry after ``delay`` seconds."""

    def __init__(self, message: str, *, delay: float = 1.0) -> None:
        super().__init__(message)
        self.delay = delay
