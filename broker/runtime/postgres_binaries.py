"""The PostgreSQL server binaries on this machine, and how we run them.

The embedded runtime runs the real ``initdb`` and ``postgres`` found on the
machine (:func:`find_postgres_bindir`); one cached template serves one major
version (:func:`server_major`). Every server binary runs in a clean
environment (:func:`server_env`) and, when we are root, as the server's OS
user (:mod:`broker.runtime.postgres_os_user`); :func:`run_to_completion` is
how the one-shot tools (``initdb``, ``postgres --single``) run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Final

from broker.errors import RuntimeUnavailable
from broker.runtime.postgres_os_user import OsUser, credentials

__all__ = [
    "DISTRO_ROOT",
    "INSTALL_HINT",
    "OUTPUT_TAIL_CHARS",
    "find_postgres_bindir",
    "run_to_completion",
    "server_env",
    "server_major",
]

INSTALL_HINT: Final = (
    "install the PostgreSQL server: `apt-get install postgresql` on Debian/Ubuntu, "
    "`dnf install postgresql-server` on Fedora/RHEL, `brew install postgresql` on macOS"
)
DISTRO_ROOT: Final = Path("/usr/lib/postgresql")  # Debian/Ubuntu: /usr/lib/postgresql/<major>/bin
OUTPUT_TAIL_CHARS: Final = 4000  # enough of a server's output to explain a failure
_TOOL_TIMEOUT_S: Final = 120  # initdb and single-user mode on a busy disk take seconds


def find_postgres_bindir(*, path: str | None = None, distro_root: Path = DISTRO_ROOT) -> Path:
    """Locate the directory holding ``initdb`` and ``postgres``.

    Searched in order: ``initdb`` on ``path`` (default ``$PATH``), the bindir
    reported by ``pg_config --bindir`` found on ``path``, then the newest
    ``<distro_root>/<major>/bin``.

    Raises:
        RuntimeUnavailable: no usable server binaries; the message says what to
            install.
    """
    candidates: list[Path] = []
    if initdb := shutil.which("initdb", path=path):
        candidates.append(Path(initdb).resolve().parent)  # Debian symlinks initdb into /usr/bin
    if pg_config := shutil.which("pg_config", path=path):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    candidates.extend(
        sorted(distro_root.glob("*/bin"), key=lambda p: _version_key(p.parent.name), reverse=True)
    )
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in ("initdb", "postgres")):
            return bindir
    searched = ", ".join(str(c) for c in candidates) or "nothing found"
    raise RuntimeUnavailable(
        f"PostgreSQL server binaries (initdb, postgres) not found on PATH, via pg_config, "
        f"or under {distro_root}/*/bin (checked: {searched}); {INSTALL_HINT}"
    )


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name)) or (-1,)


@functools.lru_cache(maxsize=8)
def server_major(bindir: Path) -> str:
    """The major version of the server in ``bindir``, e.g. ``"15"``."""
    out = subprocess.run(
        [str(bindir / "postgres"), "-V"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    # "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    if match is None:
        raise RuntimeUnavailable(f"cannot parse the version of {bindir / 'postgres'}: {out!r}")
    return match[1]


def server_env() -> dict[str, str]:
    """The environment every server binary runs in."""
    # A clean environment: PG* variables of an outer setup must not leak into
    # the server, and C locale keeps log messages parseable (port clashes).
    env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C", "LANG": "C"}
    if tz := os.environ.get("TZ"):
        env["TZ"] = tz
    return env


def run_to_completion(
    args: list[str], *, what: str, os_user: OsUser | None, stdin: str | None = None
) -> tuple[int, str]:
    """Run a one-shot server tool as the server's OS user; blocking.

    Returns:
        Its exit code and its output (stdout, then stderr).

    Raises:
        RuntimeUnavailable: it could not be run at all (``what`` names it).
    """
    try:
        proc = subprocess.run(
            args, input=stdin, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S,
            check=False, cwd="/", env=server_env(), **credentials(os_user),
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeUnavailable(f"{what} failed to run: {exc}") from exc
    return proc.returncode, proc.stdout + proc.stderr
