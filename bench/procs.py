"""Processes the benchmarks start and watch: services as OS processes, and /proc readings.

The bridge and the ingest run as ``python -m broker bridge|ingest`` children,
configured through ``EDGESYNC_*`` variables exactly as ``deploy/`` runs them,
so that their memory (``VmHWM``/``VmRSS`` from ``/proc/<pid>/status``) and CPU
time (``/proc/<pid>/stat``) are theirs alone. Processes are signalled by pid
only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

import httpx
import msgspec

__all__ = [
    "CpuMeter",
    "PostgresCpu",
    "ProcessCpu",
    "ServiceProcess",
    "cpu_seconds",
    "memory_mib",
    "reset_peak",
    "start_self_profile",
    "stop_profile",
]

_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
_STOP_TIMEOUT_S: Final = 25.0  # the services' own shutdown deadline is 20 s


def memory_mib(pid: int) -> dict[str, float]:
    """``{"rss": VmRSS, "peak": VmHWM}`` of ``pid`` in MiB (empty if it is gone)."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out["rss" if name == "VmRSS" else "peak"] = int(value.split()[0]) / 1024
    return out


def reset_peak(pid: int) -> bool:
    """Reset ``VmHWM`` of ``pid`` to its current RSS (Linux ``clear_refs`` 5)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name (which may hold spaces).
    return text.rsplit(")", 1)[1].split()


def cpu_seconds(pid: int, *, with_reaped_children: bool = False) -> float:
    """User + system CPU seconds of ``pid`` (0 if it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    ticks = int(fields[11]) + int(fields[12])
    if with_reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _CLK_TCK


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                fields = _stat_fields(int(entry.name))
                if fields is not None and int(fields[1]) == pid:
                    found.append(int(entry.name))
    return found


class CpuMeter:
    """CPU seconds used by named process groups between :meth:`start` and :meth:`stop`.

    A group is a callable returning its current CPU seconds, so that groups
    whose members come and go (PostgreSQL backends) are counted correctly.
    """

    def __init__(self) -> None:
        self._groups: dict[str, _CpuSource] = {_MACHINE: MachineCpu()}
        self._start: dict[str, float] = {}
        self._others: dict[int, tuple[str, float]] = {}
        self._wall = 0.0
        self.result: dict[str, float] = {}
        self.wall_s = 0.0

    def add(self, name: str, source: _CpuSource, *, started_within: bool = False) -> None:
        """Add a group; ``started_within``: its process started after :meth:`start`,
        so all of its CPU counts."""
        self._groups[name] = source
        if self._wall:
            self._start[name] = 0.0 if started_within else source.read()

    def start(self) -> None:
        self._wall = time.monotonic()
        self._start = {name: src.read() for name, src in self._groups.items()}
        self._others = _all_processes()

    def stop(self) -> dict[str, float]:
        """CPU seconds per group, plus ``other processes``: what the rest of the
        machine used meanwhile (other users of a shared machine show up here)."""
        self.wall_s = time.monotonic() - self._wall
        used = {
            name: src.read() - self._start.get(name, 0.0) for name, src in self._groups.items()
        }
        machine = used.pop(_MACHINE, None)
        if machine is not None:
            # Name what else ran (another user's tests on a shared machine), by command.
            mine = set().union(*(src.pids() for src in self._groups.values()))
            others: dict[str, float] = {}
            for pid, (comm, cpu) in _all_processes().items():
                if pid in mine or pid not in self._others:
                    continue
                others[comm] = others.get(comm, 0.0) + cpu - self._others[pid][1]
            for comm, cpu in sorted(others.items(), key=lambda kv: -kv[1])[:3]:
                if cpu >= 0.05:
                    used[f"other: {comm}"] = cpu
            used[OTHER] = max(0.0, machine - sum(used.values()))
        self.result = {name: round(value, 2) for name, value in used.items()}
        return self.result


class _CpuSource:
    def read(self) -> float:
        raise NotImplementedError

    def pids(self) -> set[int]:
        return set()


_MACHINE: Final = "machine"
OTHER: Final = "other (kernel, short-lived processes)"


def _all_processes() -> dict[int, tuple[str, float]]:
    """pid -> (command name, CPU seconds) of every process on the machine."""
    found: dict[int, tuple[str, float]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                text = Path(entry.path, "stat").read_text()
                comm = text[text.index("(") + 1:text.rindex(")")]
                fields = text.rsplit(")", 1)[1].split()
                found[int(entry.name)] = (comm, (int(fields[11]) + int(fields[12])) / _CLK_TCK)
    return found


class MachineCpu(_CpuSource):
    """Busy CPU seconds of the whole machine (all cores), from ``/proc/stat``."""

    def read(self) -> float:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return 0.0
        user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
        return (user + nice + system + irq + softirq) / _CLK_TCK


@dataclass
class ProcessCpu(_CpuSource):
    """CPU of one process; keeps its last reading once the process is gone."""

    pid: int
    last: float = 0.0

    def read(self) -> float:
        value = cpu_seconds(self.pid)
        if value:
            self.last = value
        return self.last

    def pids(self) -> set[int]:
        return {self.pid}


@dataclass
class PostgresCpu(_CpuSource):
    """CPU of a PostgreSQL cluster: postmaster, live children, and reaped children."""

    postmaster: int

    def read(self) -> float:
        total = cpu_seconds(self.postmaster, with_reaped_children=True)
        for child in _children(self.postmaster):
            total += cpu_seconds(child)
        return total

    def pids(self) -> set[int]:
        return {self.postmaster, *_children(self.postmaster)}


class ServiceProcess:
    """``python -m broker <kind>`` as a child process, with its settings in the environment.

    Args:
        kind: ``bridge`` or ``ingest``.
        env: ``EDGESYNC_*`` settings (added to this process's environment).
        http_port: the service's HTTP port (ingress or health), to see it ready.
        log_file: where its output goes.
        profile_to: if set, ``py-spy record`` samples the process into this file.
    """

    def __init__(
        self,
        kind: str,
        env: Mapping[str, str],
        *,
        http_port: int,
        log_file: Path,
        profile_to: Path | None = None,
    ) -> None:
        self.kind = kind
        self.env = dict(env)
        self.http_port = http_port
        self.log_file = log_file
        self.profile_to = profile_to
        self.proc: subprocess.Popen[bytes] | None = None
        self._spy: subprocess.Popen[bytes] | None = None
        self.peak_mib = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def memory(self) -> dict[str, float]:
        mem = memory_mib(self.pid)
        self.peak_mib = max(self.peak_mib, mem.get("peak", 0.0))
        return mem

    async def start(self, *, timeout: float = 60.0, need_nats: bool = False) -> None:
        """Start and wait until ``/readyz`` answers 200 (and, if asked, NATS is connected)."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - polled, like EmbeddedNats
                [sys.executable, "-m", "broker", self.kind],
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(trust_env=False) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.kind} exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    await self.stop()
                    raise RuntimeError(f"{self.kind} not ready in {timeout}s:\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    answer = await client.get(f"{self.url}/readyz", timeout=2)
                    if answer.status_code == 200 and (
                        not need_nats or answer.json().get("nats_connected", True)
                    ):
                        break
                await asyncio.sleep(0.05)
        if self.profile_to is not None:
            self._spy = _start_py_spy(self.pid, self.profile_to)

    async def wait_nats_connected(self, connected: bool, *, timeout: float = 30.0) -> None:
        """Wait until the bridge reports NATS (dis)connected."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(trust_env=False) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.TransportError, ValueError):
                    answer = await client.get(f"{self.url}/readyz", timeout=2)
                    if answer.json().get("nats_connected") is connected:
                        return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.kind} did not see NATS connected={connected} in {timeout}s")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def started_at(self, event: str) -> float | None:
        """Wall time (Unix seconds) of the first JSON log line whose event is ``event``."""
        decoder = msgspec.json.Decoder()
        with contextlib.suppress(OSError):
            for line in self.log_file.read_bytes().splitlines():
                if event.encode() not in line:
                    continue
                with contextlib.suppress(msgspec.DecodeError, KeyError, TypeError, ValueError):
                    entry = decoder.decode(line)
                    if entry.get("event") == event:
                        return datetime.fromisoformat(entry["timestamp"]).timestamp()
        return None

    async def stop(self) -> int | None:
        """SIGTERM, wait (bounded), then SIGKILL; returns the exit code. Idempotent."""
        proc = self.proc
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            self.memory()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, _STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 5)
        if self._spy is not None:
            # py-spy ends by itself when its target exits; give it time to write.
            try:
                await asyncio.to_thread(self._spy.wait, 30)
            except subprocess.TimeoutExpired:
                self._spy.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(self._spy.wait, 10)
            self._spy = None
        return proc.returncode


def _start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if exe is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    # raw = collapsed stacks: greppable, and loadable by speedscope or flamegraph.pl.
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--rate", "100", "--nonblocking", "--format", "raw",
         "--output", str(out)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def start_self_profile(out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy on this (the driver) process; stop it with :func:`stop_profile`."""
    return _start_py_spy(os.getpid(), out)


async def stop_profile(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is None:
        return
    spy.send_signal(signal.SIGINT)
    try:
        await asyncio.to_thread(spy.wait, 30)
    except subprocess.TimeoutExpired:
        spy.kill()

