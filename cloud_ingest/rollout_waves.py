"""Wave arithmetic of a rollout: how many edges each wave reaches and how many
failures a rollout tolerates. Pure, so its edge cases are unit-tested.

Waves are **cumulative** targets, as in Argo Rollouts' steps and Greengrass'
rollout rates: ``1,10%,50%,100%`` over 40 edges reaches 1, then 4, then 20,
then 40 edges in total. A percentage is rounded up (10% of 5 edges is 1, not 0),
a wave that would add nobody is dropped, and the last wave always reaches every
edge (a rollout never silently leaves edges out).

``--max-failures`` is the number of failed edges the rollout tolerates: ``3``, or a
percentage of all its edges rounded *down* (``2%`` of 10 edges tolerates none:
the first failure halts, which is what a cautious operator asked for).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from broker.errors import InvalidInput

__all__ = ["failure_budget", "parse_step", "wave_sizes"]

_STEP = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")


def parse_step(step: str, *, what: str = "wave") -> tuple[float, bool]:
    """``"10%"`` -> ``(10.0, True)``, ``"3"`` -> ``(3.0, False)``.

    Raises:
        InvalidInput: not a count or a percentage in (0, 100].
    """
    match = _STEP.match(step)
    if not match:
        raise InvalidInput(f"{what} {step!r} is neither a count (3) nor a percentage (10%)")
    value, percent = float(match.group(1)), bool(match.group(2))
    if percent and not 0 < value <= 100:
        raise InvalidInput(f"{what} {step!r}: a percentage is above 0 and at most 100")
    if not percent and (value != int(value) or value < 0):
        raise InvalidInput(f"{what} {step!r}: a count is a whole number")
    return value, percent


def wave_sizes(total: int, steps: Sequence[str]) -> list[int]:
    """How many edges each wave adds, for ``total`` edges.

    Raises:
        InvalidInput: no steps, a malformed step, or steps that go down.
    """
    if not steps:
        raise InvalidInput("waves: give at least one wave, e.g. 1,10%,50%,100%")
    targets: list[int] = []
    for step in steps:
        value, percent = parse_step(step)
        reach = math.ceil(total * value / 100 - 1e-9) if percent else int(value)
        if targets and reach < targets[-1] and reach < total:
            raise InvalidInput(f"waves are cumulative and cannot go down: {step!r} reaches "
                               f"{reach} edges after {targets[-1]}")
        targets.append(min(reach, total))
    targets[-1] = total
    sizes: list[int] = []
    reached = 0
    for target in targets:
        if target > reached:
            sizes.append(target - reached)
            reached = target
    return sizes


def failure_budget(total: int, max_failures: str) -> int:
    """The number of failed edges a rollout of ``total`` edges tolerates.

    Raises:
        InvalidInput: malformed.
    """
    value, percent = parse_step(max_failures, what="max-failures")
    return math.floor(total * value / 100 + 1e-9) if percent else int(value)
