"""The nine scenarios, in the order they run; each module's docstring says what it measures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench.data import Pool
from bench.env import BenchEnv
from bench.profiles import Profile
from bench.results import ScenarioResult
from bench.scenarios import (
    backlog,
    console,
    consume,
    edge_path,
    fleet,
    footprint,
    ingest,
    latency,
    wire,
)

if TYPE_CHECKING:  # types only: this package exports its scenarios, not its helpers' names
    from collections.abc import Awaitable, Callable

    from bench.data import Pool
    from bench.env import BenchEnv
    from bench.profiles import Profile
    from bench.results import ScenarioResult

    Runner = Callable[[BenchEnv, Profile, Pool, Callable[[str], None]], Awaitable[ScenarioResult]]

__all__ = [
    "SCENARIOS",
    "BenchEnv",
    "Pool",
    "Profile",
    "Scenario",
    "ScenarioResult",
]


@dataclass(frozen=True, slots=True)
class Scenario:
    key: str
    title: str
    run: Runner


SCENARIOS: tuple[Scenario, ...] = tuple(
    Scenario(module.KEY, module.TITLE, module.run)
    for module in (ingest, edge_path, latency, backlog, footprint, wire, fleet, consume,
                   console)
)
