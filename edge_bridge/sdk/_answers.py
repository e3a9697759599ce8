"""Reading the bridge's answers: the 200 acknowledgement, Retry-After, and 4xx refusals.

Pure functions of an HTTP response; the client decides what to do with them
(resolve, wait and retry, or fail the batch).
"""

from __future__ import annotations

import email.utils
import math
from datetime import UTC, datetime

import msgspec

from broker.errors import EdgesyncError, Forbidden, InvalidInput, RecordTooLarge, Unauthorized
from broker.protocol.ingress import IngressResponse
from edge_bridge.sdk._defaults import RETRY_AFTER_MIN_S
from edge_bridge.sdk._http import Answer

__all__ = ["decode_ack", "rejection", "retry_after_s"]

_ack_decoder = msgspec.json.Decoder(IngressResponse)
_error_decoder = msgspec.json.Decoder()


def decode_ack(body: bytes, count: int) -> IngressResponse | None:
    """The 200 answer, or None when it is not one for ``count`` records."""
    try:
        ack = _ack_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return ack if ack.count == count else None


def retry_after_s(response: Answer) -> float | None:
    """The Retry-After delay in seconds (delta-seconds or HTTP-date), or None."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(seconds, RETRY_AFTER_MIN_S)


def rejection(response: Answer) -> EdgesyncError:
    """Translate a permanent 4xx answer into the error its records fail with: a missing or
    wrong producer token (401) and a stream the token may not write (403) as such, not as
    bad input (``stats.failed_by_reason`` then says ``unauthorized`` / ``forbidden``)."""
    code = "unknown"
    message = response.text[:500] or response.reason_phrase
    try:
        body = _error_decoder.decode(response.content)
    except msgspec.DecodeError:
        body = None
    if isinstance(body, dict):
        code = str(body.get("error", code))
        message = str(body.get("message", message))
    text = f"bridge rejected the request: {message} (HTTP {response.status_code} {code})"
    kind = _REJECTIONS.get(response.status_code, InvalidInput)
    return kind(text)


_REJECTIONS: dict[int, type[EdgesyncError]] = {
    401: Unauthorized, 403: Forbidden, 413: RecordTooLarge,
}
