"""The one exception tree of edgesync.

Every error a caller can act on is one of these; foreign errors (asyncpg, nats,
sqlite3, httpx) are translated at the boundary with ``raise ... from exc`` so
retry-ability is decided once, where the error enters our code.

Errors that reach an HTTP client carry a stable ``code`` (the ``error`` field
of the JSON refusal); :data:`HTTP_STATUS` is the one table from error to status,
used by the bridge's ingress and the operator API alike::

    EdgesyncError                                                          HTTP
    ├── ConfigError              bad settings; fail at start-up with the field named
    ├── InvalidInput             bad record / stream name / command: dead letter  422
    │   ├── DecodeError          bytes that are not a valid wire message; carries 422
    │   │                        the batch's identity span when readable
    │   ├── InvalidRecords       records the cloud cannot store; (index, reason)s 422
    │   ├── InvalidName          a stream or edge name that is not a token        400
    │   ├── RecordTooLarge       one record above the per-record limit            413
    │   ├── RequestTooLarge      a request body above its limit                   413
    │   ├── InvalidEncoding      a body whose Content-Encoding does not decode    400
    │   └── UnsupportedMediaType a request body in a format we do not read        415
    ├── Unauthorized             missing or wrong operator token                  401
    ├── Forbidden                a known caller without the scope it needs        403
    ├── NotFound                 no such edge, no such command                    404
    ├── Conflict                 an idempotency key reused for something else     409
    │   └── RequestConflict      (producer, request_seq) reused for another body  409
    ├── BufferFull               back-pressure; carries retry_after (seconds)     503
    ├── CommandRejected          signature, expiry, replay or policy; carries a code
    ├── ApplyFailed              a valid, allowed command that could not be done
    ├── ClosedError              a component used after close()                   503
    ├── RootTaskEnded            a service's root task ended without being asked
    ├── RuntimeUnavailable       an embedded server cannot be found or started
    └── TemporaryError(delay)    NATS timeout, DB unavailable: retry after delay  503
        └── TopologyMissing      streams not created yet by their owner (the ingest) 503
"""

from __future__ import annotations

__all__ = [
    "HTTP_STATUS",
    "ApplyFailed",
    "BufferFull",
    "ClosedError",
    "CommandRejected",
    "ConfigError",
    "Conflict",
    "DecodeError",
    "EdgesyncError",
    "Forbidden",
    "InvalidEncoding",
    "InvalidInput",
    "InvalidName",
    "InvalidRecords",
    "NotFound",
    "RecordTooLarge",
    "RequestConflict",
    "RequestTooLarge",
    "RootTaskEnded",
    "RuntimeUnavailable",
    "TemporaryError",
    "TooManyRequests",
    "TopologyMissing",
    "Unauthorized",
    "UnsupportedMediaType",
    "http_status",
    "retry_after_s",
]


class EdgesyncError(Exception):
    """Root of every error edgesync raises on purpose.

    Attributes:
        code: stable machine-readable name of the error (the ``error`` field of
            an HTTP refusal); each class has a default, a raise site may be more
            specific (``InvalidInput(msg, code="invalid_records")``).
    """

    default_code = "error"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code or self.default_code

    def details(self) -> dict[str, object]:
        """Fields an HTTP refusal carries beside ``error`` and ``message`` (none by default)."""
        return {}


class ConfigError(EdgesyncError):
    """Settings are invalid; raised at start-up, naming the field."""

    default_code = "config_error"


class InvalidInput(EdgesyncError):
    """Input that will never become valid by retrying (a 4xx, a dead letter)."""

    default_code = "invalid_input"


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

    default_code = "invalid_records"

    def __init__(self, problems: list[tuple[int, str]]) -> None:
        shown = "; ".join(f"record {i}: {reason}" for i, reason in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(shown + more)
        self.problems = problems

    def details(self) -> dict[str, object]:
        """Each bad record's index and reason, for the 422 body."""
        return {"records": [{"index": i, "reason": r} for i, r in self.problems]}


class InvalidName(InvalidInput):
    """A stream name or edge id that is not a valid token (``[A-Za-z0-9_-]{1,64}``)."""

    default_code = "invalid_name"


class RecordTooLarge(InvalidInput):
    """A single record exceeds the per-record size limit."""

    default_code = "record_too_large"


class RequestTooLarge(InvalidInput):
    """A request (body, or one append) exceeds its size limit."""

    default_code = "request_too_large"


class InvalidEncoding(InvalidInput):
    """A request body whose ``Content-Encoding`` does not decode (broken gzip)."""

    default_code = "invalid_content_encoding"


class UnsupportedMediaType(InvalidInput):
    """A request body in a content type the receiver does not read."""

    default_code = "unsupported_media_type"


class Unauthorized(EdgesyncError):
    """A request without the credentials it needs (missing or wrong operator token)."""

    default_code = "unauthorized"


class Forbidden(EdgesyncError):
    """A caller who is who they say, asking for something their token does not allow."""

    default_code = "forbidden"


class NotFound(EdgesyncError):
    """The thing a request names does not exist (an edge, a command)."""

    default_code = "not_found"


class Conflict(EdgesyncError):
    """A request that contradicts what is stored (an idempotency key reused)."""

    default_code = "conflict"


class RequestConflict(Conflict):
    """A ``(producer, request_seq)`` already stored for a different request."""

    default_code = "request_seq_reused"


class BufferFull(EdgesyncError):
    """The edge buffer is at its byte cap and the stream's policy is ``block``."""

    default_code = "buffer_full"

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
        super().__init__(message, code=code)
        self.command_id = command_id
        self.digest = digest


class ApplyFailed(EdgesyncError):
    """The command was valid and allowed but could not be carried out (reported ``failed``)."""

    default_code = "apply_failed"


class ClosedError(EdgesyncError):
    """A component was used after it was closed."""

    default_code = "shutting_down"


class RootTaskEnded(EdgesyncError):
    """A service's root task returned or was cancelled without a stop being asked for."""

    default_code = "root_task_ended"


class RuntimeUnavailable(EdgesyncError):
    """An embedded server (nats-server, PostgreSQL) cannot be found or started."""

    default_code = "runtime_unavailable"


class TemporaryError(EdgesyncError):
    """A failure expected to clear by itself; retry after ``delay`` seconds."""

    default_code = "unavailable"

    def __init__(self, message: str, *, delay: float = 1.0, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.delay = delay


class TopologyMissing(TemporaryError):
    """JetStream streams a client needs do not exist (yet): only the cloud's owner of
    the topology creates them. ``missing`` names them."""

    def __init__(self, message: str, *, missing: list[str], delay: float = 1.0) -> None:
        super().__init__(message, delay=delay)
        self.missing = missing

    default_code = "topology_missing"


class TooManyRequests(TemporaryError):
    """The client has as much open as it may (a quota of its own, not the service's
    limit): 429 with Retry-After."""

    default_code = "too_many_requests"


HTTP_STATUS: dict[type[EdgesyncError], int] = {
    InvalidName: 400,
    InvalidEncoding: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    RecordTooLarge: 413,
    RequestTooLarge: 413,
    UnsupportedMediaType: 415,
    InvalidInput: 422,
    TooManyRequests: 429,
    BufferFull: 503,
    ClosedError: 503,
    TemporaryError: 503,
}
"""The one table from error to HTTP status; a subclass inherits its nearest entry."""


def http_status(exc: EdgesyncError) -> int:
    """The HTTP status of ``exc``: its nearest class in :data:`HTTP_STATUS`, else 500."""
    for cls in type(exc).__mro__:
        status = HTTP_STATUS.get(cls)
        if status is not None:
            return status
    return 500


def retry_after_s(exc: EdgesyncError) -> int | None:
    """Whole seconds a client should wait before retrying ``exc`` (None: do not retry)."""
    if isinstance(exc, BufferFull):
        return max(1, round(exc.retry_after))
    if isinstance(exc, TemporaryError):
        return max(1, round(exc.delay))
    if isinstance(exc, ClosedError):
        return 1
    return None
