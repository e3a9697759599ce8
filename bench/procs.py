"""Processes the benchmarks start and watch: services as OS processes, and /proc readings.

The bridge and the ingest run as ``python -m broker bridge|ingest`` children
(:mod:`broker.runtime.children`, the same wrapper the tests use), configured
through ``EDGESYNC_*`` variables exactly as ``deploy/`` runs them, so that their
memory (``VmHWM``/``VmRSS`` from ``/proc/<pid>/status``) and CPU time
(``/proc/<pid>/stat``) are theirs alone. Processes are signalled by pid only.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from broker.runtime.children import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    ServiceName,
    ServiceProcess,
)
from broker.runtime.processes import child_pids, process_stats, read_stat

__all__ = [
    "OTHER",
    "CpuMeter",
    "MachineCpu",
    "MeasuredService",
    "PostgresCpu",
    "ProcessCpu",
    "cpu_seconds",
    "memory_mib",
    "py_spy_command",
    "reset_peak",
    "start_self_profile",
    "stop_profile",
]

_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


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


def cpu_seconds(pid: int, *, with_reaped_children: bool = False) -> float:
    """User + system CPU seconds of ``pid`` (0 if it is gone)."""
    stat = read_stat(pid)
    if stat is None:
        return 0.0
    fields = stat.fields
    # After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    ticks = int(fields[11]) + int(fields[12])
    if with_reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _CLK_TCK


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
    for stat in process_stats():
        with contextlib.suppress(IndexError, ValueError):  # utime, stime: fields 14, 15
            found[stat.pid] = (stat.comm, (int(stat.fields[11]) + int(stat.fields[12])) / _CLK_TCK)
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
        for child in child_pids(self.postmaster):
            total += cpu_seconds(child)
        return total

    def pids(self) -> set[int]:
        return {self.postmaster, *child_pids(self.postmaster)}


class MeasuredService(ServiceProcess):
    """A service child (:class:`~broker.runtime.children.ServiceProcess`) whose memory the
    bench reads and which ``py-spy`` may sample.

    Args:
        service: ``bridge`` or ``ingest``.
        env: ``EDGESYNC_*`` settings (added to this process's environment).
        log_file: where its output goes.
        profile_to: if set, ``py-spy record`` samples the process into this file.
        profile_gil: py-spy samples only the thread holding the GIL (``--gil``).
    """

    def __init__(self, service: ServiceName, env: Mapping[str, str], *, log_file: Path,
                 profile_to: Path | None = None, profile_gil: bool = False) -> None:
        super().__init__(service, env, log_file=log_file)
        self.profile_to = profile_to
        self.profile_gil = profile_gil
        self._spy: subprocess.Popen[bytes] | None = None
        self.peak_mib = 0.0

    def memory(self) -> dict[str, float]:
        mem = memory_mib(self.pid)
        self.peak_mib = max(self.peak_mib, mem.get("peak", 0.0))
        return mem

    async def start(self, *, timeout: float = START_TIMEOUT_S,
                    ready: Callable[[Any], bool] | None = None, need_nats: bool = False) -> None:
        """Start and wait until ready (and, if asked, connected to NATS); then profile it."""
        if need_nats:
            ready = _nats_connected
        await super().start(timeout=timeout, ready=ready)
        if self.profile_to is not None:
            self._spy = _start_py_spy(self.pid, self.profile_to, gil=self.profile_gil)

    async def wait_nats_connected(self, connected: bool, *, timeout: float = 30.0) -> None:
        """Wait until the bridge reports NATS (dis)connected."""
        await self.wait_ready(lambda body: body.get("nats_connected") is connected,
                              what=f"NATS connected={connected}", timeout=timeout)

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Stop (see the base class), after a last memory reading; then let py-spy finish."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.memory()
        code = await super().stop(timeout)
        if self._spy is not None:
            # py-spy ends by itself when its target exits; give it time to write.
            try:
                await asyncio.to_thread(self._spy.wait, 30)
            except subprocess.TimeoutExpired:
                self._spy.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(self._spy.wait, 10)
            self._spy = None
        return code


def _nats_connected(readyz: Any) -> bool:
    return bool(readyz.get("nats_connected", True))


def py_spy_command(exe: str, pid: int, out: Path, *, gil: bool = False) -> list[str]:
    """The ``py-spy record`` command line for ``pid`` (``gil``: only the GIL's holder)."""
    # raw = collapsed stacks: greppable, and loadable by speedscope or flamegraph.pl.
    return [exe, "record", "--pid", str(pid), "--rate", "100", "--nonblocking", "--format",
            "raw", "--output", str(out), *(["--gil"] if gil else [])]


def _start_py_spy(pid: int, out: Path, *, gil: bool = False) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if exe is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        py_spy_command(exe, pid, out, gil=gil),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def start_self_profile(out: Path, *, gil: bool = False) -> subprocess.Popen[bytes] | None:
    """py-spy on this (the driver) process; stop it with :func:`stop_profile`."""
    return _start_py_spy(os.getpid(), out, gil=gil)


async def stop_profile(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is None:
        return
    spy.send_signal(signal.SIGINT)
    try:
        await asyncio.to_thread(spy.wait, 30)
    except subprocess.TimeoutExpired:
        spy.kill()

