"""How strong a bearer token must be before it may guard anything (operator tokens,
the API's bootstrap and metrics tokens, producer tokens at the bridge ingress).

The one rule: at least :data:`MIN_TOKEN_CHARS` characters and an estimated
:data:`MIN_TOKEN_BITS` bits (:func:`estimated_bits`), so ``changeme``,
``aaaa...``, ``abab...``, ``password123456...`` and empty strings are refused
with a message that says how to make a good one.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from typing import Final

from broker.errors import InvalidInput

__all__ = ["MIN_TOKEN_BITS", "MIN_TOKEN_CHARS", "check_token_strength", "estimated_bits"]

MIN_TOKEN_CHARS: Final = 24
"""Shortest token accepted (a minted operator token has 47)."""

MIN_TOKEN_BITS: Final = 80.0
"""Least estimated entropy accepted (:func:`estimated_bits`). The estimate is
conservative: 32 random hex characters (128 bits) score 95 or more, 32 random
URL-safe ones 130 or more, a minted operator token 210 or more."""


def _shannon_bits(items: Sequence[object]) -> float:
    n = len(items)
    return -n * sum(c / n * math.log2(c / n) for c in Counter(items).values()) if n else 0.0


def estimated_bits(token: str) -> float:
    """A conservative entropy estimate: the lesser of the observed Shannon entropy of
    the characters and of the steps between them, times the length. A random token
    scores under its true entropy; repeated (``aaaa``, ``abab``) and sequential
    (``0123456789``, ``abcdef``) ones score low."""
    if len(token) < 2:
        return 0.0
    steps = [ord(b) - ord(a) for a, b in itertools.pairwise(token)]
    return min(_shannon_bits(token), _shannon_bits(steps) * len(token) / len(steps))


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
