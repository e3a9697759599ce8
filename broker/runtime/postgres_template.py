"""The initdb template cache: ``initdb`` runs once per machine and major version.

The first cluster created on a machine is copied, before its first start, into
a pristine template under ``~/.cache/edgesync/pg-template-<major>`` (or
``$EDGESYNC_PG_TEMPLATE_DIR``), and later clusters are copies of it. The
template holds no password and is never started; every copy gets its own
(:mod:`broker.runtime.postgres_securing`).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import structlog

from broker.runtime.postgres_os_user import OsUser

__all__ = ["copy_template", "is_template", "save_template", "template_dir_for"]

log = structlog.get_logger(__name__)


def template_dir_for(major: str) -> Path:
    """Where the pristine initdb'ed template for server ``major`` is cached."""
    if override := os.environ.get("EDGESYNC_PG_TEMPLATE_DIR"):
        return Path(override)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "edgesync" / f"pg-template-{major}"


def is_template(template: Path, major: str) -> bool:
    """Whether ``template`` holds a complete template for server ``major``."""
    try:
        return (template / "PG_VERSION").read_text().strip() == major and (
            template / "global" / "pg_control"
        ).is_file()
    except OSError:
        return False


def copy_template(template: Path, cluster: Path, os_user: OsUser | None) -> None:
    """Make ``cluster`` (an empty directory) a copy of ``template``, owned by ``os_user``."""
    shutil.copytree(template, cluster, symlinks=True, dirs_exist_ok=True)
    if os_user is not None:
        os_user.chown_tree(cluster)
    cluster.chmod(0o700)


def save_template(cluster: Path, template: Path) -> None:
    """Copy a fresh, never-started cluster to the template cache; best effort."""
    staging = template.with_name(f".{template.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(cluster, staging, symlinks=True)
        # Atomic publish: concurrent creators race harmlessly, readers never see
        # a half-copied template.
        staging.rename(template)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if not is_template(template, (cluster / "PG_VERSION").read_text().strip()):
            log.warning("postgres_template_not_saved", template=str(template), error=str(exc))
        return
    log.info("postgres_template_saved", template=str(template))
