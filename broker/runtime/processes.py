"""Child processes that do not outlive the process that started them.

The embedded servers run in their own session (so a terminal's Ctrl-C reaches
us first and shutdown stays ordered), which also means nothing stops them if
we die without running our shutdown: SIGKILL, the OOM killer, a test runner
killed on timeout. On Linux the kernel can signal a child when its parent dies
(``PR_SET_PDEATHSIG``); util-linux's ``setpriv --pdeathsig`` sets it and execs
the server, so no Python code has to run between fork and exec (a
``preexec_fn`` is unsafe in a process with threads).

:func:`child_pids` finds a process's children (PostgreSQL's backends, to stop
or to measure them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

__all__ = ["child_pids", "die_with_parent"]


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


def child_pids(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (Linux /proc; empty elsewhere)."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                # Fields after the parenthesised command name: state, ppid, ...
                stat_line = Path(entry.path, "stat").read_text()
                if int(stat_line.rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
    return children
