"""Every module's ``__all__`` is exactly its public surface (the httpx habit).

A module's public names are the ones it defines at top level (functions,
classes, assignments) and whose names do not start with ``_``; names it
imports are someone else's. A package's ``__init__`` is the exception: its job
is to re-export public names of our own code (``broker``, ``edge_bridge``,
``cloud_ingest``, ``bench``), so the classes and functions it imports from there
count too. A module's logger and its type variables are its own tools (nothing
imports them) and do not count.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import pytest
import structlog

PACKAGES = ("broker", "edge_bridge", "cloud_ingest", "bench")

OPTIONAL = {"faststream"}
"""Dependencies of an extra the test run may lack (bench's framework baseline)."""


def _modules() -> list[str]:
    names: list[str] = []
    for package in PACKAGES:
        root = importlib.import_module(package)
        names.append(package)
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
            if info.name.rsplit(".", 1)[-1] != "__main__":  # running it is its only job
                names.append(info.name)
    return sorted(names)


def _defined(module: ModuleType) -> set[str]:
    """Public names bound by the module's own top-level statements."""
    tree = ast.parse(Path(inspect.getfile(module)).read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.add(node.name)
        elif isinstance(node, ast.Assign):
            found |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found.add(node.target.id)
    return {name for name in found if not name.startswith("_")}


_LOGGER = type(structlog.get_logger())


def _tool(value: object) -> bool:
    """A module's logger or a type variable: its own tools, which nothing imports."""
    return isinstance(value, TypeVar | _LOGGER)


def _first_party(value: object) -> bool:
    origin = getattr(value, "__module__", None) or ""
    return origin.split(".", 1)[0] in PACKAGES


def _public(module: ModuleType) -> set[str]:
    names = _defined(module)
    if Path(inspect.getfile(module)).name == "__init__.py":
        names |= {name for name, value in vars(module).items()
                  if not name.startswith("_") and _first_party(value)}
    return {name for name in names if not _tool(getattr(module, name))}


def _declares_all(name: str) -> bool:
    """Whether the module's source assigns ``__all__`` (read, not imported: some modules
    need an optional extra to import)."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    return any(
        isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
        for node in tree.body
    )


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name in OPTIONAL:
            pytest.skip(f"{name} needs the optional {exc.name!r}")
        raise


@pytest.mark.parametrize("name", [m for m in _modules() if _declares_all(m)])
def test_each_module_exports_exactly_its_public_names(name: str) -> None:
    """``__all__`` names every public name the module defines (a package: re-exports),
    and nothing else."""
    module = _import(name)
    exported = set(module.__all__)
    assert len(exported) == len(module.__all__), "a name is exported twice"
    public = _public(module)
    assert exported == public, (
        f"exported but not public: {sorted(exported - public)}; "
        f"public but not exported: {sorted(public - exported)}"
    )


def test_a_module_without_all_has_no_public_names() -> None:
    """No module leaves a public surface undeclared, so the test above sees them all."""
    undeclared = {m: sorted(_public(_import(m))) for m in _modules() if not _declares_all(m)}
    assert {m: names for m, names in undeclared.items() if names} == {}
