"""What the buffer reports about itself: sizes, backlog, drops, disk use.

Read by the bridge for heartbeats and metrics; the numbers come from the
in-memory :class:`~edge_bridge.buffer.streams.StreamTable` plus one cheap query
per stream (its oldest unshipped record) and a ``stat`` of the files.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from edge_bridge.buffer.recovery import FILE_SUFFIXES

__all__ = ["BufferStats", "disk_bytes"]


@dataclass(frozen=True, slots=True)
class BufferStats:
    records: int
    bytes: int
    max_bytes: int
    unshipped_records: int
    oldest_unshipped_age_s: float
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    """``{stream: {"overflow": n, "ttl": m}}`` since the buffer was created."""
    disk_bytes: int = 0


def disk_bytes(path: Path) -> int:
    """Bytes the database at ``path`` occupies on disk, WAL and shared memory included."""
    total = 0
    for suffix in FILE_SUFFIXES:
        with contextlib.suppress(OSError):
            total += os.stat(f"{path}{suffix}").st_size
    return total

