"""One republish round: what JetStream has not acknowledged yet, published again in order.

The API republishes pending commands, the desired-state publisher unacknowledged puts;
both rounds go the same way. One item that fails does not stop the round: an item that
can never be published (too large, say) must not hold back every item after it. Only
failures in a row stop it (NATS is away: the next round tries again).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Final, TypeVar

__all__ = ["FAILURES_IN_A_ROW", "publish_each"]

T = TypeVar("T")

FAILURES_IN_A_ROW: Final = 3
"""A round stops after this many failed publishes in a row."""


async def publish_each(items: Iterable[T],
                       publish: Callable[[T], Awaitable[bool | None]]) -> int:
    """``publish`` each of ``items`` in order; returns how many were published.

    ``publish`` answers True (published), False (failed: it counts towards the
    failures in a row) or None (settled otherwise, e.g. failed for good: neither)."""
    done = failed = 0
    for item in items:
        outcome = await publish(item)
        if outcome is None:
            continue
        if outcome:
            done += 1
            failed = 0
        else:
            failed += 1
            if failed >= FAILURES_IN_A_ROW:
                break
    return done
