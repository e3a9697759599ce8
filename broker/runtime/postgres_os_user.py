"""The OS user the embedded PostgreSQL runs as.

PostgreSQL refuses to run as root, so when we are root every server binary
runs as the unprivileged ``postgres`` OS user (created as ``edgesync-pg`` if
absent), and the cluster's files are owned by it. When we are not root the
server runs as us and nothing here applies (:func:`server_os_user` is None).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypedDict

import structlog

from broker.errors import RuntimeUnavailable

__all__ = ["Credentials", "OsUser", "credentials", "server_os_group", "server_os_user"]

log = structlog.get_logger(__name__)

_DISTRO_OS_USER: Final = "postgres"  # the account distribution packages create
_FALLBACK_OS_USER: Final = "edgesync-pg"


class Credentials(TypedDict):
    """Popen arguments selecting the OS user a server binary runs as."""

    user: int | None
    group: int | None
    extra_groups: list[int] | None


@dataclass(frozen=True)
class OsUser:
    """The unprivileged account the server runs as when we are root."""

    name: str
    uid: int
    gid: int

    def can_search(self, directory: Path) -> bool:
        st = directory.stat()
        if st.st_uid == self.uid:
            return bool(st.st_mode & stat.S_IXUSR)
        if st.st_gid in os.getgrouplist(self.name, self.gid):
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)

    def chown(self, *paths: Path) -> None:
        for path in paths:
            os.chown(path, self.uid, self.gid)

    def chown_tree(self, root: Path) -> None:
        os.chown(root, self.uid, self.gid)
        for dirpath, dirnames, filenames in os.walk(root):
            for name in (*dirnames, *filenames):
                os.lchown(os.path.join(dirpath, name), self.uid, self.gid)


def credentials(user: OsUser | None) -> Credentials:
    """What makes a child run as ``user`` (None: as us)."""
    if user is None:
        return {"user": None, "group": None, "extra_groups": None}
    # extra_groups=[] drops root's supplementary groups in the child.
    return {"user": user.uid, "group": user.gid, "extra_groups": []}


def server_os_group() -> int | None:
    """The group id of the OS user the server runs as when that is not us (we are
    root), else None: a directory that must hold a cluster gives it search rights."""
    user = server_os_user()
    return None if user is None else user.gid


def server_os_user() -> OsUser | None:
    """The account the server runs as; None when we are not root (it then runs as us).

    Raises:
        RuntimeUnavailable: we are root and no such account exists or can be made.
    """
    if os.geteuid() != 0:
        return None
    for name in (_DISTRO_OS_USER, _FALLBACK_OS_USER):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return OsUser(pw.pw_name, pw.pw_uid, pw.pw_gid)
    useradd = shutil.which("useradd") or shutil.which("useradd", path="/usr/sbin:/sbin")
    if useradd is None:
        raise RuntimeUnavailable(
            "running as root, PostgreSQL needs an unprivileged OS user, and neither "
            f"'{_DISTRO_OS_USER}' exists nor is useradd available to create "
            f"'{_FALLBACK_OS_USER}'; run as a normal user or create one of those users"
        )
    proc = subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", _FALLBACK_OS_USER],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    try:
        pw = pwd.getpwnam(_FALLBACK_OS_USER)  # also covers a concurrent useradd winning the race
    except KeyError:
        raise RuntimeUnavailable(
            f"could not create OS user {_FALLBACK_OS_USER} for PostgreSQL: {proc.stderr.strip()}"
        ) from None
    log.info("postgres_os_user_created", os_user=_FALLBACK_OS_USER, uid=pw.pw_uid)
    return OsUser(pw.pw_name, pw.pw_uid, pw.pw_gid)
