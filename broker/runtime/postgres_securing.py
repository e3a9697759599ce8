"""Securing an embedded PostgreSQL cluster: its own passwords, password-only access.

Every connection, TCP and socket alike, authenticates with ``scram-sha-256``:
another local user cannot walk in. Each cluster gets its own generated
password for the bootstrap superuser, set in single-user mode before the server
first listens and kept in ``<data_dir>/edgesync.password`` (0600). A cluster made
by an older edgesync (trust) is switched over the same way on its next start.

The services never hold that one: they connect as a role that owns their
database and is no superuser, with a password of its own
(``<data_dir>/edgesync.app.password``, 0600; :func:`app_password`).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Final

import structlog

from broker.errors import RuntimeUnavailable
from broker.runtime.postgres_binaries import OUTPUT_TAIL_CHARS, run_to_completion
from broker.runtime.postgres_os_user import OsUser

__all__ = ["BOOTSTRAP_USER", "app_password", "quote_ident", "secure_cluster"]

log = structlog.get_logger(__name__)

BOOTSTRAP_USER: Final = "postgres"
"""The superuser initdb makes; other roles are created from it on first start. A
fixed name lets one cached template serve every role a cluster is asked for."""

_PASSWORD_FILE: Final = "edgesync.password"
_APP_PASSWORD_FILE: Final = "edgesync.app.password"
_PG_HBA: Final = """\
# Written by edgesync (broker/runtime/postgres_securing.py): passwords, always.
local   all  all                 scram-sha-256
host    all  all  127.0.0.1/32   scram-sha-256
host    all  all  ::1/128        scram-sha-256
"""


def quote_ident(name: str) -> str:
    """``name`` as an SQL identifier (double-quoted, quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


def secure_cluster(bindir: Path, cluster: Path, os_user: OsUser | None) -> str:
    """Give ``cluster`` a password and a password-only pg_hba.conf, once; return
    the password. Blocking; the server must not be running.

    Raises:
        RuntimeUnavailable: single-user mode failed; the message carries its output.
    """
    password_file = cluster / _PASSWORD_FILE
    if (kept := _read_secret(password_file)) is not None:
        return kept
    password = secrets.token_urlsafe(24)  # URL-safe: goes into DSNs as is
    # Single-user mode reads SQL on stdin and opens no socket: the password is
    # set before the server ever listens, and never appears on a command line.
    code, output = run_to_completion(
        [str(bindir / "postgres"), "--single", "-D", str(cluster),
         # A fresh cluster holds nothing yet: its shutdown checkpoint need not
         # fsync (the template copy is not fsynced either); seconds on a busy disk.
         "-c", "fsync=off", "-c", "full_page_writes=off", BOOTSTRAP_USER],
        what="postgres --single", os_user=os_user,
        stdin=f"ALTER ROLE {quote_ident(BOOTSTRAP_USER)} PASSWORD '{password}';\n",
    )  # fmt: skip
    if code != 0 or "ERROR" in output:
        raise RuntimeUnavailable(
            f"setting the cluster password failed:\n{output[-OUTPUT_TAIL_CHARS:]}"
        )
    hba = cluster / "pg_hba.conf"
    hba.write_text(_PG_HBA)
    if os_user is not None:
        os_user.chown(hba)
    _write_secret(password_file, password)
    log.info("postgres_password_set", data_dir=str(cluster))
    return password


def app_password(cluster: Path) -> str:
    """The password of the role the services connect as, made once per cluster and
    kept beside the superuser's (0600). Blocking."""
    password_file = cluster / _APP_PASSWORD_FILE
    if (kept := _read_secret(password_file)) is not None:
        return kept
    password = secrets.token_urlsafe(24)
    _write_secret(password_file, password)
    return password


def _read_secret(path: Path) -> str | None:
    """The secret kept in ``path``; None when there is none (no file, or an empty one a
    crash left behind: a new secret is then made and set)."""
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _write_secret(path: Path, secret: str) -> None:
    """Write ``secret`` to ``path`` (0600) whole or not at all: a temporary file renamed."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temporary, path)
