"""The chaos results table (docs/reliability.md) is updated by one machine's results
file, never cut down to the scenarios that machine ran."""

from __future__ import annotations

from typing import Any

from tests.chaos.report import table


def _result(scenario: str, acknowledged: int) -> dict[str, Any]:
    return {"scenario": scenario, "acknowledged": acknowledged, "committed": acknowledged,
            "lost": 0, "duplicated": 0, "dropped_by_policy": 0, "recover_s": 1.0,
            "at": "2026-12-03T00:00:00Z", "notes": ""}


def test_a_scenario_missing_from_the_results_keeps_its_row_and_the_others_are_updated(
) -> None:
    before = table([_result("kill a", 10), _result("cut b", 20), _result("wipe c", 30)])
    after = table([_result("cut b", 21), _result("new d", 40), _result("cut b", 22)], before)
    rows = after.splitlines()[2:]
    assert [r.split(" | ")[0].removeprefix("| ") for r in rows] == [
        "kill a", "cut b", "wipe c", "new d"]
    assert rows[0] == before.splitlines()[2]  # kept as it was
    assert "| 22 |" in rows[1] and "| 21 |" not in rows[1]  # the latest result
    assert rows[2] == before.splitlines()[4]
