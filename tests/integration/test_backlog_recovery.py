"""A damaged buffer holding a big backlog: the salvage at open keeps memory bounded and
survives being killed (the backlog never stays behind in quarantine)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from broker.pg_connecting import connected
from broker.protocol.wire import CT_RAW, Record
from broker.runtime.embedded_nats import EmbeddedNats
from broker.settings import StreamPolicy
from edge_bridge.buffer import Buffer, encode_chunks
from tests.helpers import until
from tests.integration.harness import (
    bridge_settings,
    buffered_is,
    running_bridge,
    running_ingest,
    wait_for_records,
)

BACKLOG_BYTES = 160 * 1024**2
"""The damaged buffer's backlog: far above what the salvage may hold at once."""
SALVAGE_RSS_BOUND = 48 * 1024**2
"""Peak RSS a salvage may add, whatever the backlog: SQLite's page caches (16 MiB for
the buffer's connections) plus a page of chunks (64 x ~256 KiB)."""

_OPEN = """
import asyncio, json, sys
from pathlib import Path
from broker.settings import StreamPolicy
from edge_bridge.buffer import Buffer

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024

async def main():
    before = hwm()
    buf = Buffer(Path(sys.argv[1]), max_bytes=10**10, policy_for=lambda s: StreamPolicy())
    async with buf:
        records = (await buf.stats()).records
    print("RESULT " + json.dumps({"before": before, "after": hwm(), "records": records,
                      "salvaged": buf.recovery.salvaged_records}), flush=True)

asyncio.run(main())
"""


def _child(directory: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _OPEN, str(directory)], stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


async def _damaged_backlog(directory: Path) -> None:
    """A stopped buffer of BACKLOG_BYTES over 20 streams with three pages overwritten in
    the middle of its chunk data."""
    payload = os.urandom(2_400)
    chunks = encode_chunks([Record(1, CT_RAW, payload) for _ in range(100)])
    appends = BACKLOG_BYTES // (100 * 2_400)
    async with Buffer(directory, max_bytes=10**10, policy_for=lambda s: StreamPolicy(),
                      sync_mode="normal") as buf:
        await asyncio.gather(*(buf.append(f"s{i % 20}", chunks) for i in range(appends)))
    db = directory / "buffer.sqlite3"
    with db.open("r+b") as f:
        f.seek(db.stat().st_size // 2)
        f.write(bytes(range(256)) * 48)


def _open_in_child(directory: Path) -> dict[str, int]:
    child = _child(directory)
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0, f"opening the damaged buffer failed ({child.returncode})"
    # The buffer logs on stdout too: the result is the line marked as such.
    line = next(x for x in out.decode().splitlines() if x.startswith("RESULT "))
    result: dict[str, int] = json.loads(line.removeprefix("RESULT "))
    return result


async def test_salvaging_a_big_damaged_backlog_holds_a_bounded_amount_of_memory(
    tmp_path: Path,
) -> None:
    """A damaged file holding 160 MiB of records is salvaged chunk page by chunk page:
    the opening process's peak RSS grows by less than SALVAGE_RSS_BOUND (it grew by
    about the whole backlog when every chunk was read into memory first), and the
    intact records are all there."""
    directory = tmp_path / "buf"
    await _damaged_backlog(directory)
    result = await asyncio.to_thread(_open_in_child, directory)
    grown = result["after"] - result["before"]
    print(f"\nsalvage of {BACKLOG_BYTES >> 20} MiB: peak RSS +{grown >> 20} MiB, "
          f"{result['salvaged']} records kept")
    assert result["salvaged"] > 0 and result["records"] == result["salvaged"]
    assert grown < SALVAGE_RSS_BOUND


async def test_a_bridge_killed_while_salvaging_salvages_again_and_loses_nothing(
    tmp_path: Path,
) -> None:
    """kill -9 while the damaged backlog is being salvaged, three times at different
    moments: the next open still holds every record a salvage left alone keeps (the
    damaged file was moved to quarantine first, and a kill then left a fresh, empty
    buffer that never looked at quarantine again: the whole backlog silently gone)."""
    directory = tmp_path / "buf"
    await _damaged_backlog(directory)
    reference_dir = tmp_path / "reference"
    shutil.copytree(directory, reference_dir)
    expected = (await asyncio.to_thread(_open_in_child, reference_dir))["records"]
    assert expected > 0
    for delay in (0.0, 0.2, 0.6):
        child = _child(directory)
        deadline = time.monotonic() + 60
        # The first sign of a salvage under way: the damaged file moved or a copy begun.
        while not ((directory / "quarantine").exists()
                   or (directory / "buffer.sqlite3.salvage").exists()):
            assert child.poll() is None, "the open ended before a salvage was seen"
            assert time.monotonic() < deadline, "no salvage began"
            await asyncio.sleep(0.002)
        await asyncio.sleep(delay)
        child.send_signal(signal.SIGKILL)
        await asyncio.to_thread(child.wait, 10)
    async with Buffer(directory, max_bytes=10**10, policy_for=lambda s: StreamPolicy()) as buf:
        records = (await buf.stats()).records
    assert records == expected


async def test_records_lost_to_damage_are_accounted_and_the_stream_drains(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """A damaged backlog loses some chunks in the middle of its streams: each lost run
    is reported to the cloud as a drop run with reason 'damaged', the watermarks pass
    them, every salvaged record commits once, and the buffer empties (before, the
    cloud's watermark stopped below the first hole for good, and the bridge kept every
    later record of the stream until its buffer was full)."""
    settings = bridge_settings(tmp_path)
    payload = os.urandom(2_400)
    chunks = encode_chunks([Record(1, CT_RAW, payload) for _ in range(10)])
    async with Buffer(settings.buffer_dir, max_bytes=10**10,
                      policy_for=lambda s: StreamPolicy()) as buf:
        for i in range(400):
            await buf.append(f"s{i % 2}", chunks)
        next_seqs = {s: buf.stream_state(s).next_seq for s in ("s0", "s1")}  # type: ignore[union-attr]
    db = settings.buffer_dir / "buffer.sqlite3"
    with db.open("r+b") as f:
        f.seek(db.stat().st_size // 2)
        f.write(bytes(range(256)) * 48)
    async with running_ingest(pg_dsn, nats_server.url), \
            running_bridge(settings, nats_server.url) as bridge:
        lost = bridge.buffer.recovery.lost_records
        kept = bridge.buffer.recovery.salvaged_records
        assert kept < 4_000  # the damage cost records
        await until(lambda: buffered_is(bridge, 0), timeout=60,
                    message="the streams never drained past the damaged records")
        await wait_for_records(pg_dsn, kept, timeout=30)
    async with connected(pg_dsn) as conn:
        rows = await conn.fetch(
            "SELECT stream, watermark, missing_records, committed_records, dropped_records "
            "FROM v_completeness ORDER BY stream")
        damaged = await conn.fetchval(
            "SELECT sum(count) FROM drop_markers WHERE reason = 'damaged'")
    assert [(r["stream"], r["watermark"], r["missing_records"]) for r in rows] == [
        (s, next_seqs[s] - 1, 0) for s in ("s0", "s1")]
    assert sum(r["committed_records"] for r in rows) == kept
    assert damaged == lost == 4_000 - kept == sum(r["dropped_records"] for r in rows)
