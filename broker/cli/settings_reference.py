"""The settings reference: every ``EDGESYNC_*`` variable with its default and meaning,
generated from the models so the documentation cannot drift from the code.

``edgesync settings`` prints it; ``docs/operations.md`` embeds it (a test keeps the
two equal).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from broker.settings import Settings

__all__ = ["BEGIN", "END", "settings_reference"]

BEGIN = "<!-- settings-reference:begin -->"
END = "<!-- settings-reference:end -->"


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(group)"
    if isinstance(value, dict | list | tuple | set | frozenset):
        return f"`{json.dumps(sorted(value) if isinstance(value, set | frozenset) else value)}`"
    return f"`{value}`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        env = f"{prefix}{name.upper()}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if field.description:
                rows.append(f"| `{env}__*` | (group) | {field.description} |")
            rows.extend(_rows(annotation, f"{env}__"))
            continue
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{env}` | {_default(field)} | {description} |")
    return rows


def settings_reference() -> str:
    """The Markdown table of every setting."""
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    lines += _rows(Settings, "EDGESYNC_")
    return "\n".join(lines) + "\n"
