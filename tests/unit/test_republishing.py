"""A republish round goes past an item that fails, stops after three failures in a row,
and counts an item settled otherwise (None) neither way."""

from __future__ import annotations

import pytest

from cloud_ingest.republishing import FAILURES_IN_A_ROW, publish_each


async def run(outcomes: list[bool | None]) -> tuple[int, list[int]]:
    tried: list[int] = []

    async def publish(i: int) -> bool | None:
        tried.append(i)
        return outcomes[i]

    return await publish_each(range(len(outcomes)), publish), tried


async def test_one_item_that_fails_holds_back_none_after_it() -> None:
    assert await run([False, True, True]) == (2, [0, 1, 2])


async def test_failures_in_a_row_end_the_round() -> None:
    outcomes: list[bool | None] = [True, *[False] * FAILURES_IN_A_ROW, True]
    assert await run(outcomes) == (1, list(range(1 + FAILURES_IN_A_ROW)))


@pytest.mark.parametrize("between", [True, None])
async def test_a_success_resets_the_count_and_none_is_neither(between: bool | None) -> None:
    outcomes = [False, False, between, False, False, True]
    done, tried = await run(outcomes)
    # None does not reset the count: the fourth failure in a row (index 3) ends it.
    assert tried == ([0, 1, 2, 3, 4, 5] if between else [0, 1, 2, 3])
    assert done == (2 if between else 0)
