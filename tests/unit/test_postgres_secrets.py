"""The embedded cluster's password files: made once, 0600, whole or not at all."""

from __future__ import annotations

from pathlib import Path

from broker.runtime.postgres_securing import app_password


def test_the_services_password_is_made_once_and_kept_0600(tmp_path: Path) -> None:
    first = app_password(tmp_path)
    assert len(first) >= 32
    kept = tmp_path / "edgesync.app.password"
    assert kept.stat().st_mode & 0o777 == 0o600
    assert app_password(tmp_path) == first
    assert not list(tmp_path.glob("*.tmp"))


def test_an_empty_password_file_a_crash_left_gets_a_new_password(tmp_path: Path) -> None:
    """An empty file read as the password would set the role's password to '' (which
    PostgreSQL takes as none: the services could never log in again)."""
    (tmp_path / "edgesync.app.password").write_text("")
    made = app_password(tmp_path)
    assert made
    assert (tmp_path / "edgesync.app.password").read_text().strip() == made
