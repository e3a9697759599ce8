"""How strong a bearer token must be before it may guard anything (operator tokens,
the API's bootstrap and metrics tokens, producer tokens at the bridge ingress).

The one rule: at least :data:`MIN_TOKEN_CHARS` characters and an estimated
:data:`MIN_TOKEN_BITS` bits (:func:`estimated_bits`), so ``changeme``,
``aaaa...``, ``abab...`` and empty strings are refused with a message that says
how to make a good one.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Final

from broker.errors import InvalidInput

__all__ = ["MIN_TOKEN_BITS", "MIN_TOKEN_CHARS", "check_token_strength", "estimated_bits"]

MIN_TOKEN_CHARS: Final = 24
"""Shortest token accepted (a minted operator token has 47)."""

MIN_TOKEN_BITS: Final = 96.0
"""Least estimated entropy accepted (:func:`estimated_bits`); 32 random URL-safe
characters score ~150, a minted operator token ~256."""


def estimated_bits(token: str) -> float:
    """A conservative entropy estimate: length times the observed Shannon entropy per
    character. A random token scores a little under its true entropy; repeated or
    patterned ones (``aaaa``, ``abababab``) score low."""
    if not token:
        return 0.0
    n = len(token)
    per_char = -sum(c / n * math.log2(c / n) for c in Counter(token).values())
    return n * per_char


def check_token_strength(token: str, *, what: str = "token") -> str:
    """``token`` if it is strong enough to guard something.

    Raises:
        InvalidInput: too short or too predictable (code ``weak_token``), saying what
            to use instead.
    """
    bits = estimated_bits(token)
    if len(token) < MIN_TOKEN_CHARS or bits < MIN_TOKEN_BITS:
        raise InvalidInput(
            f"{what} is too weak ({len(token)} characters, ~{bits:.0f} bits estimated; need "
            f"at least {MIN_TOKEN_CHARS} characters and ~{MIN_TOKEN_BITS:.0f} bits): use a "
            "random one, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`",
            code="weak_token")
    return token
