"""Services as OS processes in a test, ``edgesync up`` as one, and the two port helpers
that are not port 0.

Children bind port 0 and report the port they got (:mod:`broker.runtime.children`,
shared with ``bench/``). Two things cannot work that way, and each has its helper:

- :func:`refused_port`: a port where nothing answers, for "the peer is down" tests.
  The socket stays bound (never listening) while the test runs, so connections are
  refused and no other process can take the port meanwhile.
- :func:`port_for_config`: a port chosen *before* its server starts, for servers
  whose peers must be told the address up front (the routes of a nats-server
  cluster name each other's ports in their command lines). It binds and releases,
  so another process could take it first: use it only where a config needs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from broker.connecting import connect_once
from broker.protocol.topology import Topology
from broker.runtime.children import START_TIMEOUT_S, ServiceProcess, settings_env
from broker.settings import BridgeSettings, LogSettings, NatsSettings
from tests.support.waiting import until

__all__ = [
    "BridgeProcess",
    "UpProcess",
    "alive",
    "edgesync_up",
    "init_topology",
    "port_for_config",
    "refused_port",
]

_UP_READY_S = 30.0
"""Seconds ``edgesync up`` may take to write runtime.json: it starts NATS and
PostgreSQL (initdb from a cached template) first."""

_UP_STOP_S = 30.0
"""Seconds ``edgesync up`` may take to stop after Ctrl-C."""

_REAP_S = 10.0
"""Seconds for the kernel to reap a SIGKILLed child."""


async def init_topology(nats_url: str, **topology: Any) -> None:
    """Create the streams and the watermark bucket, as ``edgesync streams init`` does.

    The cloud owns the topology and a bridge only waits for it, so a test that runs a
    bridge before (or without) an ingest plays the admin step first. NATS down (a test
    of an outage): nothing to do, the ingest started later creates them."""
    try:
        nc = await connect_once(nats_url.split(","), timeout_s=3, connect_timeout=1)
    except Exception:
        return
    try:
        js = nc.jetstream()
        await Topology(**topology).ensure_all(js)
    finally:
        await nc.close()


class BridgeProcess(ServiceProcess):
    """``python -m broker bridge`` as a child process (for kill -9 tests), configured by
    the same settings an in-process bridge takes; ``url`` is known once started."""

    def __init__(self, settings: BridgeSettings, nats_url: str, log_file: Path) -> None:
        nats = NatsSettings(url=nats_url, publish_timeout_s=2)
        env = settings_env(bridge=settings, nats=nats, log=LogSettings(level="info"))
        super().__init__("bridge", env, log_file=log_file)
        self.settings = settings
        self.nats_url = nats_url

    async def start(self, *, timeout: float = START_TIMEOUT_S,
                    ready: Callable[[Any], bool] | None = None) -> None:
        """Start it after the admin step: a bridge only waits for the cloud's streams."""
        await init_topology(self.nats_url)
        await super().start(timeout=timeout, ready=ready)


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie holds nothing and counts as gone)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the parenthesised command name, which may hold spaces.
    return stat_line.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class UpProcess:
    """A running ``edgesync up``: its process, state directory and runtime.json."""

    def __init__(self, proc: subprocess.Popen[bytes], state: Path, log_file: Path,
                 runtime: dict[str, Any]) -> None:
        self.proc = proc
        self.state = state
        self.log_file = log_file
        self.runtime = runtime

    @property
    def runtime_file(self) -> Path:
        return self.state / "runtime.json"

    def interrupt(self) -> int:
        """Ctrl-C (SIGINT) and wait for the exit code."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(_UP_STOP_S)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_file.read_text(errors="replace")[-chars:]


def _complete_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None while it is missing or half-written."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@contextlib.asynccontextmanager
async def edgesync_up(tmp: Path, *args: str, state: Path | None = None
                      ) -> AsyncIterator[UpProcess]:
    """``edgesync up --state-dir STATE ARGS`` as a child, from a clean environment
    (no ``EDGESYNC_*`` of ours), yielded once its runtime.json is complete; killed on
    the way out if the test has not stopped it. ``state`` defaults to ``TMP/state``;
    as root, pass a directory the PostgreSQL server user can reach (the
    ``reachable_dir`` fixture): ``edgesync up`` keeps its cluster there."""
    state = tmp / "state" if state is None else state
    log_file = tmp / "up.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESYNC_")}
    with log_file.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "up", "--state-dir", str(state), *args],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    try:
        runtime = await until(lambda: _complete_json(state / "runtime.json"),
                              timeout=_UP_READY_S, interval=0.1,
                              message="runtime.json never appeared")
        yield UpProcess(proc, state, log_file, runtime)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(_REAP_S)


@contextlib.contextmanager
def refused_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A loopback port that refuses connections for as long as the block runs."""
    with socket.socket() as sock:
        sock.bind((host, 0))  # bound, never listening: a SYN is answered with RST
        yield int(sock.getsockname()[1])


def port_for_config(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, for a server whose peers need it in advance.

    Prefer port 0 and the server's report; see the module docstring for why this
    exists at all.
    """
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
