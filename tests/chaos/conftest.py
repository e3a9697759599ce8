"""Fixtures of the fault-injection suite: the whole system as OS processes.

Every test here is marked ``chaos`` (deselected by default; ``pytest -m chaos``
runs them all); the short subset marked ``chaos_ci`` runs with the default suite.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.chaos.harness import ChaosSystem, chaos_system


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Nothing under tests/chaos escapes the ``chaos`` marker."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.chaos)


@pytest.fixture
async def system(tmp_path: Path) -> AsyncIterator[ChaosSystem]:
    """The default system: PostgreSQL, nats-server, two ingests, two bridges."""
    async with chaos_system(tmp_path) as running:
        yield running
