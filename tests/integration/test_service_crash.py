"""A service process whose root task crashes exits non-zero (what Kubernetes must see).

The child is the real ``edgesync ingest`` command line against a real
nats-server and PostgreSQL, started through a small wrapper script whose only
addition is a test hook: once the test creates a trigger file, one root task
(the watermark publisher) raises, or returns as if it were done.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from broker.runtime.embedded_nats import EmbeddedNats
from tests.helpers import until

_WRAPPER = textwrap.dedent('''
    """``edgesync ingest`` whose watermark root task ends when a trigger file appears."""
    import asyncio
    import sys
    from pathlib import Path

    from broker.cli.main import main
    from cloud_ingest.watermarks import WatermarkPublisher

    trigger, how = Path(sys.argv[1]), sys.argv[2]

    async def publish_forever(self: WatermarkPublisher) -> None:
        while not trigger.exists():
            await asyncio.sleep(0.02)
        if how == "crash":
            raise RuntimeError("injected crash of the watermarks root")

    WatermarkPublisher.publish_forever = publish_forever  # type: ignore[method-assign]
    sys.argv = ["edgesync", "ingest"]
    main()
''')


@pytest.mark.parametrize(("how", "expected_code", "event"), [
    ("crash", 1, "service_crashed"),
    ("return", 2, "service_failed"),
])
async def test_a_crashed_root_task_makes_the_service_exit_non_zero(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str,
    how: str, expected_code: int, event: str,
) -> None:
    """The first root to end stops the service, and the process exit code says so."""
    wrapper = tmp_path / "crashing_ingest.py"
    wrapper.write_text(_WRAPPER)
    trigger = tmp_path / "crash-now"
    log_path = tmp_path / "ingest.log"
    env = {
        **os.environ,
        "EDGESYNC_INGEST__POSTGRES_DSN": pg_dsn,
        "EDGESYNC_INGEST__PORT": "0",
        "EDGESYNC_NATS__URL": nats_server.url,
        "EDGESYNC_LOG__FORMAT": "json",
        "EDGESYNC_LOG__LEVEL": "info",
    }
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(wrapper), str(trigger), how],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path,
        )
    try:
        await until(lambda: "ingest_started" in log_path.read_text(), timeout=60,
                    message="the ingest never started")
        assert proc.poll() is None, "the ingest exited before its root task was made to end"
        trigger.touch()
        code = await until(proc.poll, timeout=30, message="the ingest did not exit")
        output = log_path.read_text()
        assert code == expected_code, output
        assert "root_task_ended" in output and event in output
        assert "ingest_stopped" in output  # the ordered shutdown and close still ran
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


_UP_WRAPPER = _WRAPPER.replace(
    '"""``edgesync ingest`` whose', '"""``edgesync up`` whose ingest\'s',
).replace('sys.argv = ["edgesync", "ingest"]', 'sys.argv = ["edgesync", "up", *sys.argv[3:]]')


async def test_edgesync_up_stops_and_exits_non_zero_when_one_of_its_services_crashes(
    tmp_path: Path, reachable_dir: Path,
) -> None:
    """`edgesync up` supervises its services like each service supervises its roots:
    the ingest's crashed root stops everything, and the exit code says so."""
    wrapper = tmp_path / "crashing_up.py"
    wrapper.write_text(_UP_WRAPPER)
    trigger = tmp_path / "crash-now"
    state = reachable_dir / "state"
    log_path = tmp_path / "up.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESYNC_")}
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(wrapper), str(trigger), "crash", "--state-dir", str(state),
             "--bridge-port", "0", "--api-port", "0"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path,
        )
    try:
        await until((state / "runtime.json").exists, timeout=60,
                    message="edgesync up never started")
        assert proc.poll() is None, "edgesync up exited before its ingest was made to crash"
        trigger.touch()
        code = await until(proc.poll, timeout=60, message="edgesync up did not exit")
        output = log_path.read_text()
        assert code == 1, output
        assert "injected crash of the watermarks root" in output
        assert not (state / "runtime.json").exists()  # it cleaned up on the way out
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
