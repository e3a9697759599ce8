"""Rollout waves are cumulative targets (rounded up, empty waves dropped, the last one
reaches everybody); the failure budget rounds a percentage down."""

from __future__ import annotations

import pytest

from broker.errors import InvalidInput
from cloud_ingest.rollout_waves import failure_budget, wave_sizes


@pytest.mark.parametrize(("total", "steps", "sizes"), [
    (10, ["1", "50%", "100%"], [1, 4, 5]),
    (40, ["1", "10%", "50%", "100%"], [1, 3, 16, 20]),
    (10, ["1", "10%", "50%", "100%"], [1, 4, 5]),  # 10% of 10 adds nobody: dropped
    (5, ["10%"], [5]),  # the last wave always reaches every edge
    (3, ["5", "100%"], [3]),
    (7, ["33%", "66%", "100%"], [3, 2, 2]),  # rounded up: 2.31 -> 3, 4.62 -> 5
    (0, ["1", "100%"], []),
])
def test_wave_sizes(total: int, steps: list[str], sizes: list[int]) -> None:
    assert wave_sizes(total, steps) == sizes
    assert sum(sizes) == total


@pytest.mark.parametrize(("steps", "message"), [
    ([], "at least one wave"),
    (["ten"], "neither a count"),
    (["0%"], "above 0"),
    (["150%"], "at most 100"),
    (["1.5"], "whole number"),
    (["50%", "2"], "cannot go down"),
])
def test_bad_waves_are_refused_with_a_reason(steps: list[str], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        wave_sizes(100, steps)


@pytest.mark.parametrize(("total", "given", "budget"), [
    (10, "2%", 0), (100, "2%", 2), (150, "2%", 3), (10, "3", 3), (10, "0", 0),
    (10, "100%", 10),
])
def test_failure_budget(total: int, given: str, budget: int) -> None:
    assert failure_budget(total, given) == budget
