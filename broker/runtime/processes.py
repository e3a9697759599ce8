"""Child processes that do not outlive the process that started them.

The embedded servers run in their own session (so a terminal's Ctrl-C reaches
us first and shutdown stays ordered), which also means nothing stops them if
we die without running our shutdown: SIGKILL, the OOM killer, a test runner
killed on timeout. On Linux the kernel can signal a child when its parent dies
(``PR_SET_PDEATHSIG``); util-linux's ``setpriv --pdeathsig`` sets it and execs
the server, so no Python code has to run between fork and exec (a
``preexec_fn`` is unsafe in a process with threads).

:func:`process_stats` reads ``/proc/<pid>/stat`` of every process (the one
place that parses it); :func:`child_pids` finds a process's children
(PostgreSQL's backends, to stop or to measure them), and
:func:`kill_with_children` kills a process and those children and reaps them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "ProcStat",
    "child_pids",
    "die_with_parent",
    "kill_with_children",
    "process_stats",
    "read_stat",
]

_PR_SET_CHILD_SUBREAPER: Final = 36  # from <linux/prctl.h>
_REAP_POLL_S: Final = 0.002  # seconds between looks at killed children: they die at once


def die_with_parent(sig: signal.Signals) -> list[str]:
    """The command prefix that makes a child receive ``sig`` when its parent dies.

    The "parent" is the thread that called ``Popen``: start servers from a
    long-lived thread (the event loop's). Empty where ``setpriv`` is missing:
    the child then simply lives on until stopped.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return []
    return [setpriv, "--pdeathsig", sig.name.removeprefix("SIG"), "--"]


@dataclass(frozen=True, slots=True)
class ProcStat:
    """One ``/proc/<pid>/stat`` line, split around the parenthesised command name."""

    pid: int
    comm: str
    fields: list[str]
    """The fields after the command name: state, ppid, ... (field 3 onwards in proc(5))."""


def read_stat(pid: int) -> ProcStat | None:
    """``/proc/<pid>/stat`` of ``pid``; None when it is gone (or this is not Linux)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    head, _, rest = text.rpartition(")")  # a command name may itself hold ")"
    return ProcStat(pid, head[head.find("(") + 1 :], rest.split())


def process_stats() -> Iterator[ProcStat]:
    """The stat line of every process; one that exits while we look is skipped."""
    try:
        entries = [entry.name for entry in os.scandir("/proc") if entry.name.isdigit()]
    except OSError:
        return
    for name in entries:
        if (found := read_stat(int(name))) is not None:
            yield found


def child_pids(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (Linux /proc; empty elsewhere)."""
    children: list[int] = []
    for found in process_stats():
        with contextlib.suppress(IndexError, ValueError):
            if int(found.fields[1]) == pid:
                children.append(found.pid)
    return children


def kill_with_children(proc: subprocess.Popen[bytes], *, timeout: float = 5.0) -> bool:
    """SIGKILL ``proc`` and its children, by pid, and reap them; bounded by ``timeout``.

    Children that call setsid() (PostgreSQL's do) escape a process-group kill.
    Stopping the parent first freezes the set of children: it cannot fork
    more, nor reap the ones we kill, so their pids cannot be reused under us.
    While the parent dies we are a child subreaper, so its killed children are
    reparented to us and we reap them; left to an init that does not reap (as
    in many containers) they would linger as zombies.

    Returns:
        False when the process, or a child, was still there ``timeout``
        seconds after its kill (only a stuck kernel gets there), else True.
    """
    if proc.poll() is not None:
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGSTOP)
    children = child_pids(proc.pid)
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    adopting = bool(children) and _set_child_subreaper(True)
    try:
        proc.kill()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:  # pragma: no cover - only a stuck kernel gets here
        return False
    finally:
        if adopting:
            _set_child_subreaper(False)  # adopted children stay ours until reaped
    # Wait for the children too: one still attached to a resource (PostgreSQL's
    # shared memory) would make the next start refuse it.
    return _reap(children, deadline=time.monotonic() + timeout)


def _set_child_subreaper(enabled: bool) -> bool:
    """prctl(PR_SET_CHILD_SUBREAPER); False where unsupported (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _reap(pids: list[int], *, deadline: float) -> bool:
    """Wait until every pid is gone, reaping those that are our children."""
    pending = set(pids)
    while pending:
        for pid in list(pending):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    pending.discard(pid)
            except ChildProcessError:  # not ours (no subreaper): a zombie elsewhere is fine
                if _is_gone(pid):
                    pending.discard(pid)
        if not pending:
            break
        if time.monotonic() >= deadline:
            return False
        time.sleep(_REAP_POLL_S)
    return True


def _is_gone(pid: int) -> bool:
    found = read_stat(pid)
    # Zombies hold no resources; an unreadable line means the process is gone.
    return found is None or not found.fields or found.fields[0] in ("Z", "X")
