"""The one exception tree of edgesync.

Every error a caller can act on is one of these; foreign errors (asyncpg, nats,
sqlite3, httpx) are translated at the boundary with ``raise ... from exc`` so
retry-ability is decided once, where the error enters our code.

::

    EdgesyncError
    ├── ConfigError              bad settings; fail at start-up with the field named
    ├── InvalidInput             bad record / stream name / command: 4xx, dead letter
    │   ├── DecodeError          bytes that are not a valid wire message
    │   └── RecordTooLarge       one record above the per-record limit (413)
    ├── BufferFull               back-pressure; carries retry_after (seconds)
    ├── CommandRejected          signature, expiry, replay or policy; carries a code
    ├── ClosedError              a component used after close()
    ├── RuntimeUnavailable       an embedded server cannot be found or started
    └── TemporaryError(delay)    NATS timeout, DB unavailable: retry after delay
        └── TopologyMissing      streams not created yet by their owner (the ingest)
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
    "RecordTooLarge",
    "RuntimeUnavailable",
    "TemporaryError",
    "TopologyMissing",
]


class EdgesyncError(Exception):
    """Root of every error edgesync raises on purpose."""


class ConfigError(EdgesyncError):
    """Settings are invalid; raised at start-up, naming the field."""


class InvalidInput(EdgesyncError):
    """Input that will never become valid by retrying (a 4xx, a dead letter)."""


class DecodeError(InvalidInput):
    """Bytes that are not a valid wire message; ``str(exc)`` is the reason."""


class RecordTooLarge(InvalidInput):
    """A single record exceeds the per-record size limit."""


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


class TopologyMissing(TemporaryError):
    """JetStream streams a client needs do not exist (yet): only the cloud's owner of
    the topology creates them. ``missing`` names them."""

    def __init__(self, message: str, *, missing: list[str], delay: float = 1.0) -> None:
        super().__init__(message, delay=delay)
        self.missing = missing
