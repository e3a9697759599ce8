"""An application whose bridge answers 503 BufferFull for a long time: its memory stays
bounded by the SDK's settings and it gets clear errors."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from broker.runtime.embedded_nats import EmbeddedNats
from tests.integration.harness import bridge_settings, running_bridge

MAX_PENDING_BYTES = 16 * 1024**2
RSS_SLACK = 48 * 1024**2
"""What the application may hold beyond MAX_PENDING_BYTES: the interpreter's own
growth while publishing, a batch being encoded, the HTTP client."""

_APP = """
import asyncio, json, sys
from broker.errors import BufferFull
from edge_bridge.sdk import EdgeClient

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024

async def main(url, max_pending_bytes):
    payload = b"x" * 64_000
    refused, published, message = 0, 0, ""
    async with EdgeClient(url, max_pending_bytes=max_pending_bytes, batch_max_bytes=256_000,
                          retry_timeout_s=30, close_timeout_s=0.5) as client:
        before = hwm()
        # 2,000 records of 64 kB: 128 MB if nothing pushed back.
        while published + refused < 2_000:
            try:
                client.publish("s", payload)
                published += 1
            except BufferFull as exc:
                refused += 1
                message = str(exc)
            await asyncio.sleep(0)
        after = hwm()
    print("RESULT " + json.dumps({"before": before, "after": after, "published": published,
                                  "refused": refused, "message": message}), flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_an_app_publishing_large_records_to_a_full_bridge_holds_bounded_memory(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    """NATS is down and the bridge's buffer is full (policy block): the bridge answers
    503. An application keeps publishing 64 kB records: the SDK takes them until
    max_pending_bytes (16 MiB) is pending, then refuses with BufferFull naming the
    bound; the application's peak RSS grows by less than that plus RSS_SLACK (by count
    alone, 100,000 pending records, it took all 128 MB)."""
    await nats_server.stop()
    settings = bridge_settings(tmp_path, buffer_max_bytes=1024**2)
    async with running_bridge(settings, nats_server.url) as bridge:
        app = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _APP, bridge.url, str(MAX_PENDING_BYTES),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(app.communicate(), timeout=60)
    assert app.returncode == 0
    line = next(x for x in out.decode().splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    grown = result["after"] - result["before"]
    print(f"\napp: {result['published']} records taken, {result['refused']} refused, "
          f"peak RSS +{grown >> 20} MiB")
    assert result["refused"] > 0
    assert f"max_pending_bytes={MAX_PENDING_BYTES}" in result["message"]
    assert result["published"] * 64_000 < MAX_PENDING_BYTES + 1024**2 + 256_000
    assert grown < MAX_PENDING_BYTES + RSS_SLACK
