"""Writing a small file so that a crash leaves either the old or the new content.

The one recipe (write a temporary sibling, fsync it, rename it over the target,
fsync the directory) used by whatever must survive a power loss whole: the
bridge's runtime overrides, key files. Both sides may use it; it imports
nothing of ours. :func:`write_private` is the same recipe for secrets (keys,
seeds, tokens, ``runtime.json``): 0600 from the first byte, in a 0700 directory.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO

__all__ = ["make_private_dir", "open_private_log", "write_atomically", "write_private"]


def write_atomically(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` by ``data``, durably and all at once.

    The content goes to ``<name>.tmp`` beside it (created with ``mode``, so a
    secret is never readable by others, not even briefly), is fsynced, and is
    renamed over ``path``; then the directory is fsynced so the rename itself
    survives a power loss (where the filesystem allows it).
    """
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left over by a crash mid-write
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    with contextlib.suppress(OSError):  # directory fsync: not every filesystem allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def make_private_dir(path: Path) -> None:
    """Create directory ``path`` and every missing parent of it 0700.

    ``mkdir(parents=True, mode=0o700)`` gives only the last directory that mode: the
    parents it makes get the default (0755 under the usual umask), so a state directory
    made on the way to its key directory would be world-readable. A directory that
    already exists keeps the mode its owner gave it.
    """
    missing: list[Path] = []
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile: its maker's mode
            directory.mkdir(mode=0o700)
            directory.chmod(0o700)  # mkdir's mode is filtered by the umask


def write_private(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600), atomically.

    The file is created 0600 before a byte is written, so a secret never sits
    in a world-readable file, not even for a moment. The parent directory is
    created 0700 if missing.
    """
    make_private_dir(path.parent)
    write_atomically(path, data.encode() if isinstance(data, str) else data, mode=0o600)


def open_private_log(path: Path) -> BinaryIO:
    """``path`` opened for appending, readable by its owner only (0600), created so.

    A service's log names subjects, edges and addresses: in a state directory that
    another OS user may traverse (PostgreSQL's, run as root) it is nobody else's to
    read. A log an older run left wider is narrowed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")
