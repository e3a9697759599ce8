"""Exponential backoff with jitter: the one formula every retry loop uses."""

from __future__ import annotations

import random

__all__ = ["backoff_s"]


def backoff_s(attempt: int, *, base_s: float = 0.1, cap_s: float = 5.0) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry).

    ``base_s * 2**attempt`` capped at ``cap_s``, times a random factor in
    [0.5, 1) so that many clients failing together do not retry together.
    """
    grown: float = base_s * 2.0 ** min(max(attempt, 0), 16)
    return min(cap_s, grown) * random.uniform(0.5, 1.0)
