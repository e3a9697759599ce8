"""The directory an embedded PostgreSQL cluster lives in: found, made, removed.

A data directory that already holds a cluster (``PG_VERSION``) is reused as it
is. Otherwise one is made there: a copy of the cached template when there is
one (:mod:`broker.runtime.postgres_template`), else by ``initdb``, whose fresh
result then becomes the template. When the server runs as another OS user
that cannot reach the data directory, an ephemeral cluster lives in a private
temporary directory behind a symlink; a persistent one is refused rather than
silently moved. Only a cluster this instance made is ever removed.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

import structlog

from broker.errors import RuntimeUnavailable
from broker.runtime.postgres_binaries import OUTPUT_TAIL_CHARS, run_to_completion, server_major
from broker.runtime.postgres_os_user import OsUser
from broker.runtime.postgres_securing import BOOTSTRAP_USER
from broker.runtime.postgres_template import (
    copy_template,
    is_template,
    save_template,
    template_dir_for,
)

__all__ = ["ClusterDir", "ClusterSource"]

log = structlog.get_logger(__name__)

ClusterSource = Literal["existing", "template", "initdb"]
"""Where a cluster came from: the data directory held it, a copy of the cached
template, or a fresh ``initdb``."""


class ClusterDir:
    """The cluster directory of one :class:`~broker.runtime.embedded_postgres.EmbeddedPostgres`.

    Args:
        data_dir: where the cluster is (or is to be made).
        ephemeral: the cluster may live elsewhere behind a symlink when the
            server's OS user cannot reach ``data_dir``.
    """

    def __init__(self, data_dir: Path, *, ephemeral: bool) -> None:
        self.data_dir = Path(data_dir).absolute()
        self._ephemeral = ephemeral
        self.real: Path | None = None
        """``data_dir``, or where it points when relocated; known once prepared."""
        self.created = False
        """This instance ran initdb or copied the template."""
        self._relocated = False

    def prepare(self, bindir: Path, os_user: OsUser | None) -> ClusterSource:
        """Make sure the directory holds a cluster; say where it came from. Blocking.

        Raises:
            RuntimeUnavailable: the directory holds something else, the server's
                OS user cannot reach a persistent one, or initdb failed.
        """
        if self.real is not None and (self.real / "PG_VERSION").exists():
            return "existing"
        data_dir = self.data_dir
        if (data_dir / "PG_VERSION").exists():
            self.real = data_dir.resolve()
            return "existing"
        if data_dir.exists() and any(data_dir.iterdir()):
            raise RuntimeUnavailable(
                f"{data_dir} is not empty and holds no PostgreSQL cluster (no PG_VERSION); "
                "point data_dir at an empty or missing directory"
            )
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        real = self._make_dir(os_user).resolve()
        self.real = real
        self.created = True
        major = server_major(bindir)
        template = template_dir_for(major)
        if is_template(template, major):
            copy_template(template, real, os_user)
            return "template"
        _initdb(bindir, real, os_user)
        save_template(real, template)
        return "initdb"

    def remove(self) -> None:
        """Delete the cluster (and the symlink to a relocated one)."""
        if self.real is not None:
            shutil.rmtree(self.real, ignore_errors=True)
        if self._relocated:
            with contextlib.suppress(FileNotFoundError):
                self.data_dir.unlink()
        log.info("postgres_cluster_removed", data_dir=str(self.data_dir))

    def _make_dir(self, user: OsUser | None) -> Path:
        data_dir = self.data_dir
        blocked = (
            None
            if user is None
            else next((p for p in reversed(data_dir.parents) if not user.can_search(p)), None)
        )
        if user is not None and blocked is not None:
            # e.g. pytest's tmp_path lives under a 0700 /tmp/pytest-of-root: the
            # server user cannot reach it. An ephemeral cluster can live elsewhere
            # behind a symlink; a persistent one must not silently move to /tmp.
            if not self._ephemeral:
                raise RuntimeUnavailable(
                    f"PostgreSQL runs as OS user {user.name!r}, which cannot reach {data_dir} "
                    f"({blocked} is not searchable by it); choose a data dir under a path "
                    f"{user.name!r} can traverse"
                )
            real = Path(tempfile.mkdtemp(prefix="edgesync-pg-"))
            if data_dir.exists():
                data_dir.rmdir()  # checked empty above
            data_dir.symlink_to(real, target_is_directory=True)
            self._relocated = True
            log.info("postgres_data_dir_relocated", data_dir=str(data_dir), real_dir=str(real))
        else:
            data_dir.mkdir(exist_ok=True)
            real = data_dir
        if user is not None:
            user.chown(real)
        real.chmod(0o700)
        return real


def _initdb(bindir: Path, real: Path, os_user: OsUser | None) -> None:
    started = time.monotonic()
    code, output = run_to_completion(
        [str(bindir / "initdb"), "-D", str(real), "-U", BOOTSTRAP_USER,
         "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
        what="initdb", os_user=os_user,
    )  # fmt: skip
    if code != 0:
        raise RuntimeUnavailable(
            f"initdb exited with code {code}:\n{output[-OUTPUT_TAIL_CHARS:]}"
        )
    log.info("postgres_initdb", data_dir=str(real), seconds=round(time.monotonic() - started, 3))
