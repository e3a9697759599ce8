"""Opening the bridge's local SQLite files (record buffer, control store) one way.

Both are WAL databases used with explicit transactions (``isolation_level=None``)
from a worker thread, and both honour the bridge's ``sync_mode``: ``full``
fsyncs every commit, anything else trades the last commits before a power loss
for speed. The PRAGMAs that say so live here and nowhere else.

Two more keep the disk use bounded when much is deleted at once (a watermark that
catches up over a long outage's backlog, TTL or overflow drops):

- ``secure_delete=FAST``: SQLite builds that default to ``secure_delete=ON``
  (Debian's, among others) zero every freed page, so a delete writes every byte it
  frees into the WAL: a trim of a 134 MiB backlog grew the WAL to 135 MiB (and
  doubled the flash writes of every record). FAST zeroes only what costs no extra
  I/O;
- ``journal_size_limit``: the WAL file is reused, never shrunk, so it kept the size
  of the largest transaction for good; past :data:`WAL_SIZE_LIMIT_BYTES` it is
  truncated back to that at the next checkpoint reset.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Final

__all__ = ["WAL_SIZE_LIMIT_BYTES", "connect_wal"]

WAL_SIZE_LIMIT_BYTES: Final = 64 * 1024 * 1024
"""What a WAL file is truncated back to after a transaction made it larger."""


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
    conn.execute("PRAGMA secure_delete=FAST")
    conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
    if busy_timeout_ms is not None:
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    if cache_kib is not None:
        conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")  # negative: KiB, not pages
    return conn
