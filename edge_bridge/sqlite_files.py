"""Opening the bridge's local SQLite files (record buffer, control store) one way.

Both are WAL databases used with explicit transactions (``isolation_level=None``)
from a worker thread, and both honour the bridge's ``sync_mode``: ``full``
fsyncs every commit, anything else trades the last commits before a power loss
for speed. The PRAGMAs that say so live here and nowhere else.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["connect_wal"]


def connect_wal(
    path: Path,
    *,
    sync_mode: str,
    busy_timeout_ms: int | None = None,
    cache_kib: int | None = None,
) -> sqlite3.Connection:
    """Open ``path`` in WAL mode with ``synchronous`` set from ``sync_mode``.

    Args:
        path: the database file (created when missing).
        sync_mode: ``"full"`` for ``synchronous=FULL``, anything else ``NORMAL``.
        busy_timeout_ms: how long a statement waits for another connection's lock.
        cache_kib: page cache size; bounds the connection's memory.
    """
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={'FULL' if sync_mode == 'full' else 'NORMAL'}")
    if busy_timeout_ms is not None:
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    if cache_kib is not None:
        conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")  # negative: KiB, not pages
    return conn
