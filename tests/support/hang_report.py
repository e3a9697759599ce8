"""A report on a test that runs far longer than any should: once ``HANG_REPORT_S``
passed (``EDGESYNC_TEST_HANG_REPORT_S``, 300 s by default), every thread's stack and
every asyncio task's stack go to the terminal, past pytest's output capture. It fails
nothing and stops nothing: a test that hangs in CI (the whole run then ends at CI's
deadline, its captured output lost) names what it waits for.

``pytest_runtest_protocol`` is a hook: ``tests/conftest.py`` imports it.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import io
import os
import sys
import tempfile
import threading
from collections.abc import Generator

import pytest

__all__ = ["HANG_REPORT_S", "pytest_runtest_protocol"]

HANG_REPORT_S = float(os.environ.get("EDGESYNC_TEST_HANG_REPORT_S", "300"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None
                            ) -> Generator[None, object, object]:
    """Setup, call and teardown: a fixture that hangs while stopping a server is
    reported as a test body is."""
    timer = threading.Timer(HANG_REPORT_S, _report, args=(item,))
    timer.daemon = True
    timer.start()
    try:
        return (yield)
    finally:
        timer.cancel()


def _report(item: pytest.Item) -> None:
    """On the timer's thread: the threads' stacks now, the tasks' on their loop's thread."""
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        threads = f.read()
    _print(item, f"\n=== {item.nodeid}: still running after {HANG_REPORT_S:g} s ===\n"
                 f"--- threads ---\n{threads}")
    for loop in [o for o in gc.get_objects()
                 if isinstance(o, asyncio.AbstractEventLoop) and o.is_running()]:
        loop.call_soon_threadsafe(_report_tasks, item, loop)


def _report_tasks(item: pytest.Item, loop: asyncio.AbstractEventLoop) -> None:
    out = io.StringIO()
    for task in asyncio.all_tasks(loop):
        out.write(f"--- task {task.get_name()} ---\n")
        task.print_stack(file=out)
    _print(item, out.getvalue())


def _print(item: pytest.Item, text: str) -> None:
    capture = item.config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        sys.stderr.write(text)
        return
    with capture.global_and_fixture_disabled():
        sys.stderr.write(text)
        sys.stderr.flush()
