"""Files only their owner may read: keys, seeds, tokens, runtime.json.

The one place that writes a secret to disk, so every secret gets the same care:
created 0600 before a byte is written, written to a temporary name, fsynced,
and renamed into place (a reader never sees half a key).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["write_private"]


def write_private(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600), atomically.

    The file is created 0600 before a byte is written, so a secret never sits
    in a world-readable file, not even for a moment. The parent directory is
    created 0700 if missing.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left over by a crash mid-write
    # O_EXCL: never write through a file (or symlink) someone else put there.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, raw)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
