"""Child processes that do not outlive the process that started them.

The embedded servers run in their own session (so a terminal's Ctrl-C reaches
us first and shutdown stays ordered), which also means nothing stops them if
we die without running our shutdown: SIGKILL, the OOM killer, a test runner
killed on timeout. On Linux the kernel can signal a child when its parent dies
(``PR_SET_PDEATHSIG``); util-linux's ``setpriv --pdeathsig`` sets it and execs
the server, so no Python code has to run between fork and exec (a
``preexec_fn`` is unsafe in a process with threads).
"""

from __future__ import annotations

import shutil
import signal

__all__ = ["die_with_parent"]


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
