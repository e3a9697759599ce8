"""Validation of the names that become NATS subject tokens: edge ids and stream names.

They are interpolated into subjects (``es.rec.<edge>.<stream>``), so a dot or a
wildcard would let one edge publish into another's namespace. One rule, used by
the SDK, the bridge ingress and the ingest alike.
"""

from __future__ import annotations

import re

from broker.errors import InvalidInput

__all__ = ["TOKEN_PATTERN", "is_valid_token", "validate_token"]

TOKEN_PATTERN = r"[A-Za-z0-9_-]{1,64}"
_TOKEN = re.compile(TOKEN_PATTERN)


def is_valid_token(value: object) -> bool:
    """True when ``value`` is a string usable as an edge id or stream name."""
    return isinstance(value, str) and _TOKEN.fullmatch(value) is not None


def validate_token(what: str, value: object) -> str:
    """Return ``value`` if it is a valid token.

    Raises:
        InvalidInput: naming ``what`` (e.g. "stream name") and the rule.
    """
    if not is_valid_token(value):
        raise InvalidInput(
            f"invalid {what} {value!r}: must match {TOKEN_PATTERN} "
            "(letters, digits, '_' and '-', 1 to 64 characters)"
        )
    assert isinstance(value, str)
    return value
