"""The documentation that is generated from code stays equal to the code."""

from __future__ import annotations

import re
from pathlib import Path

from broker.cli.settings_reference import BEGIN, END, settings_reference

ROOT = Path(__file__).resolve().parents[2]


def test_operations_doc_holds_the_current_settings_reference() -> None:
    """docs/operations.md embeds exactly what `edgesync settings` prints: regenerate it
    with `edgesync settings --write-docs docs/operations.md` after changing a setting."""
    text = (ROOT / "docs" / "operations.md").read_text()
    embedded = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()
    assert embedded == settings_reference().strip()


def test_every_setting_is_documented() -> None:
    """Every settings field carries a description."""
    undocumented = [line for line in settings_reference().splitlines()[2:]
                    if line.rstrip().endswith("|  |")]
    assert undocumented == []


def _setting_names() -> set[str]:
    return set(re.findall(r"EDGESYNC_[A-Z0-9_]+", settings_reference()))


def _docs() -> list[Path]:
    return [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]


def test_every_setting_the_docs_name_exists() -> None:
    """A setting named in the docs (`EDGESYNC_GROUP__FIELD`, or a field in a
    "`EDGESYNC_GROUP__*`: `FIELD`, ..." list) is one `edgesync settings` prints: the docs
    once told readers to set `EDGESYNC_API__READ_REQUIRES_TOKEN`, which never existed."""
    names = _setting_names()
    unknown = []
    for doc in _docs():
        text = doc.read_text()
        for found in re.finditer(r"EDGESYNC_[A-Z0-9_]*__[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_]*\*)",
                                 text):
            if found.group(0) not in names:
                unknown.append(f"{doc.name}: {found.group(0)}")
        for listed in re.finditer(r"`(EDGESYNC_[A-Z0-9_]+__)\*`:((?:\s*`[A-Z0-9_]+`[^`.]*)+)",
                                  text):
            unknown += [f"{doc.name}: {listed.group(1)}{field}"
                        for field in re.findall(r"`([A-Z0-9_]+)`", listed.group(2))
                        if listed.group(1) + field not in names]
    assert unknown == []


def _python_blocks(markdown: str) -> list[str]:
    """The ```python blocks of a markdown text, in order."""
    return [block.split("```", 1)[0] for block in markdown.split("```python\n")[1:]]


def test_every_sdk_doc_example_runs_as_a_script() -> None:
    """docs/sdk.md's Python examples compile as they stand in a file of their own (a
    top-level ``async with`` or ``await`` is a SyntaxError there), so a reader can
    copy one into a script and run it."""
    blocks = _python_blocks((ROOT / "docs" / "sdk.md").read_text())
    assert len(blocks) >= 2
    for number, block in enumerate(blocks, 1):
        compile(block, f"docs/sdk.md python block {number}", "exec")
