"""A bridge whose buffer files were damaged while it was stopped starts, and keeps flowing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.chaos.harness import ChaosSystem, Load
from tests.helpers import until

pytestmark = pytest.mark.chaos


async def test_bridge_with_garbage_buffer_quarantines_it_and_never_crash_loops(
    system: ChaosSystem,
) -> None:
    """Overwrite a stopped bridge's buffer file with garbage (after its records were
    committed): it starts, moves the damaged files into quarantine/, mints new
    epochs, and the load flows again without loss."""
    bridge = system.bridges["edge-a"]
    buffer_dir = Path(bridge.env["EDGESYNC_BRIDGE__BUFFER_DIR"])
    async with Load(system) as load:
        await load.wait_acked(2_000)
    await system.quiesce(load)  # everything acked so far is safe in PostgreSQL
    await bridge.stop()
    db = buffer_dir / "buffer.sqlite3"
    await asyncio.to_thread(db.write_bytes, b"\x5a" * 64 * 1024)  # the header is gone
    await bridge.start()  # raises if the bridge exits instead of starting
    quarantined = await until(lambda: list((buffer_dir / "quarantine").glob("*/*")), timeout=5)
    assert any(p.name == "buffer.sqlite3" for p in quarantined)
    async with Load(system) as more:
        await more.wait_acked(2_000)
    more.acked.update(load.acked)
    recover = await system.quiesce(more)
    outcome = await system.reconcile("buffer overwritten with garbage while stopped", more,
                                     recover_s=recover, notes="quarantined, new epochs")
    assert outcome.lost == 0 and outcome.duplicated == 0, outcome
    log = await asyncio.to_thread(bridge.log_file.read_text)
    assert "buffer_quarantined" in log
