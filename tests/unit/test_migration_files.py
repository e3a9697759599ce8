"""The numbered migration files: one file per number, no number missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_ingest.schema import _migrations


def _write(folder: Path, *names: str) -> Path:
    for name in names:
        (folder / name).write_text("SELECT 1;\n", encoding="utf-8")
    return folder


def test_the_shipped_migrations_are_numbered_without_gaps_or_repeats() -> None:
    versions = [version for version, _, _ in _migrations()]
    assert versions == list(range(1, len(versions) + 1))


def test_two_files_with_one_number_are_refused(tmp_path: Path) -> None:
    _write(tmp_path, "001_a.sql", "002_b.sql", "002_c.sql")
    with pytest.raises(ValueError, match=r"002_b\.sql.*002_c\.sql"):
        _migrations(tmp_path)


def test_a_missing_number_is_refused(tmp_path: Path) -> None:
    _write(tmp_path, "001_a.sql", "003_c.sql", "views.sql")
    with pytest.raises(ValueError, match="without gaps"):
        _migrations(tmp_path)


def test_files_in_order_are_read_in_order(tmp_path: Path) -> None:
    _write(tmp_path, "002_b.sql", "001_a.sql", "views.sql", "notes.txt")
    assert [name for _, name, _ in _migrations(tmp_path)] == ["001_a.sql", "002_b.sql"]
