"""The ingest process keeps the heap memory it frees (``INGEST_MALLOC``, broker.cli.services)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


@glibc
def test_glibc_takes_the_settings() -> None:
    """In a child process (the setting is process-wide): every mallopt call succeeds."""
    code = ("from broker.cli.services import INGEST_MALLOC, reuse_freed_memory; "
            "print(reuse_freed_memory(INGEST_MALLOC))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "True", out


@glibc
def test_a_freed_large_block_is_reused_without_page_faults() -> None:
    """What the setting is for: a group's worth of large blocks (here 40 of 1 MiB), freed
    and asked for again, comes back without touching fresh pages. By default glibc
    returns the freed top of its heap to the kernel (past a trim threshold of twice the
    largest block freed so far), so every round faulted all of them in again."""
    code = """
import resource, sys
from broker.cli.services import INGEST_MALLOC, reuse_freed_memory
if sys.argv[1] == "tuned":
    assert reuse_freed_memory(INGEST_MALLOC)
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [bytearray(1024 * 1024) for _ in range(40)]  # zero-filled: pages touched
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[5:]))
"""
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True,
                             text=True, check=True, timeout=60)
        return int(out.stdout.strip().splitlines()[-1])

    tuned, default = faults("tuned"), faults("default")
    assert tuned < 1_000, tuned
    assert default > 10_000, default
