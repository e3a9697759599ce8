"""``edgesync up``'s progress lines: one per interval while records move, one more when
they stop, then none while idle (a line every 2 s of an idle run grew a log without end)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from broker.cli.local_run import _summarise
from tests.support import until


class _Registry:
    """A metrics registry that reports one counter, and counts how often it was read."""

    def __init__(self, name: str) -> None:
        self.name, self.value, self.reads = name, 0.0, 0

    def collect(self) -> list[Any]:
        self.reads += 1
        return [SimpleNamespace(samples=[SimpleNamespace(name=self.name, value=self.value)])]


async def test_lines_while_records_move_one_when_they_stop_then_none() -> None:
    accepted = _Registry("edgesync_records_accepted_total")
    shipped = _Registry("edgesync_records_shipped_total")
    committed = _Registry("edgesync_records_committed_total")
    bridge = SimpleNamespace(metrics=SimpleNamespace(registry=_Bridge(accepted, shipped)))
    ingest = SimpleNamespace(metrics=SimpleNamespace(registry=committed))
    lines: list[str] = []
    stop = asyncio.Event()
    task = asyncio.create_task(_summarise([bridge], ingest, stop, 0.001, lines.append))
    try:
        await until(lambda: committed.reads >= 5, message="never read the counters")
        assert lines == []  # idle from the start: quiet

        for r in (accepted, shipped, committed):
            r.value = 100
        await until(lambda: len(lines) >= 1, message="no line once records moved")
        reads = committed.reads
        await until(lambda: committed.reads >= reads + 10, message="stopped reading")
        assert len(lines) == 2  # the move, then one line as they stopped
        assert "accepted        100" in lines[0]
        assert lines[1].count("(       0/s)") == 3
    finally:
        stop.set()
        await task


class _Bridge:
    """A bridge's registry holding both of its counters."""

    def __init__(self, *registries: _Registry) -> None:
        self.registries = registries

    def collect(self) -> list[Any]:
        return [m for r in self.registries for m in r.collect()]
