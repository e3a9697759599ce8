"""The SDK's options, defaults and limits: one definition for both clients.

:class:`~edge_bridge.sdk.client.EdgeClient` takes the options as keyword
arguments with these defaults and documents what each means;
:class:`~edge_bridge.sdk.sync_client.SyncEdgeClient` takes the same
:class:`ClientOptions` and forwards them, so neither list is kept in sync by hand.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Final, TypedDict

if TYPE_CHECKING:
    import httpx

__all__ = [
    "BACKOFF_INITIAL_S",
    "BACKOFF_MAX_S",
    "DEFAULT_BATCH_MAX_BYTES",
    "DEFAULT_BATCH_MAX_RECORDS",
    "DEFAULT_CLOSE_TIMEOUT_S",
    "DEFAULT_LINGER_MS",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_PENDING_BYTES",
    "DEFAULT_MAX_PENDING_RECORDS",
    "DEFAULT_MAX_RECORD_BYTES",
    "DEFAULT_REQUEST_TIMEOUT_S",
    "DEFAULT_RETRY_TIMEOUT_S",
    "DEFAULT_URL",
    "MAX_RETRY_TIMEOUT_S",
    "RETRY_AFTER_MIN_S",
    "WIRE_RECORD_OVERHEAD_BYTES",
    "ClientOptions",
    "Default",
    "require",
]

DEFAULT_URL: Final = "http://127.0.0.1:8787"
"""The bridge's ingress on its default port, on this host."""
DEFAULT_BATCH_MAX_RECORDS: Final = 1000
DEFAULT_BATCH_MAX_BYTES: Final = 1024 * 1024
"""Matches the bridge's default request limit (and NATS' default message size)."""
DEFAULT_LINGER_MS: Final = 5.0
"""Latency batching may add to a record, in milliseconds."""
DEFAULT_MAX_IN_FLIGHT: Final = 4
DEFAULT_MAX_RECORD_BYTES: Final = 1024 * 1024
"""The bridge's default ``max_record_bytes``."""
DEFAULT_RETRY_TIMEOUT_S: Final = 60.0
DEFAULT_REQUEST_TIMEOUT_S: Final = 10.0
DEFAULT_CLOSE_TIMEOUT_S: Final = 5.0
"""How long ``close`` (and leaving ``async with``) waits for the bridge to acknowledge
what is pending before it fails those records and returns: long enough for a
bridge that is merely busy, short enough that an application can always stop."""
DEFAULT_MAX_PENDING_RECORDS: Final = 100_000
"""Bounds the number of unconfirmed records."""
DEFAULT_MAX_PENDING_BYTES: Final = 256 * 1024 * 1024
"""Bounds the memory of unconfirmed records (their payload, key and headers plus
~16 bytes each): the record count alone let 100,000 records of up to 1 MiB each
pile up while the bridge answered 503."""

BACKOFF_INITIAL_S: Final = 0.05
"""First retry delay after an error; doubles per failed attempt (with jitter)."""
BACKOFF_MAX_S: Final = 2.0
"""Cap of the error backoff: a recovering bridge is found within ~2 s."""
MAX_RETRY_TIMEOUT_S: Final = 300.0
"""Retries must end well inside the bridge's 10-minute request de-duplication
window; a retry after it could be stored a second time."""
RETRY_AFTER_MIN_S: Final = 0.05
"""Floor under a bridge's Retry-After, so ``Retry-After: 0`` cannot spin."""
WIRE_RECORD_OVERHEAD_BYTES: Final = 16
"""Estimated wire framing per record beyond payload/key/headers (msgpack array, ts, ct,
nils), charged when sizing a batch; not the buffer's per-record storage charge."""


class ClientOptions(TypedDict, total=False):
    """The keyword options of both clients (meaning: :class:`EdgeClient`'s docstring)."""

    producer_id: str | None
    batch_max_records: int
    batch_max_bytes: int
    linger_ms: float
    max_in_flight: int
    max_record_bytes: int
    retry_timeout_s: float
    request_timeout_s: float
    close_timeout_s: float | None
    max_pending_records: int
    max_pending_bytes: int
    transport: httpx.AsyncBaseTransport | None
    token: str | None


class Default(enum.Enum):
    """Marks an argument left out (``None`` already means "wait forever")."""

    TIMEOUT = "the client's close_timeout_s"


def require(condition: bool, message: str) -> None:
    """Refuse an out-of-range option.

    Raises:
        ValueError: with ``message``, naming the option.
    """
    if not condition:
        raise ValueError(message)
