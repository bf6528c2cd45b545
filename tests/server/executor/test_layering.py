"""The executor sees the engine's sequences only through `RunnerSeq`: no module of it imports weir_server.engine."""

from __future__ import annotations

import ast
from pathlib import Path

import weir_server.executor


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every module `path` imports, at any depth (lazy imports inside functions too), relative ones resolved."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_no_executor_module_imports_the_engine():
    package = Path(weir_server.executor.__file__).parent
    modules = sorted(package.rglob("*.py"))
    assert modules
    offenders = {
        str(path.relative_to(package)): sorted(
            name for name in _imported_modules(path, _package_of(path)) if _is_engine(name)
        )
        for path in modules
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def _is_engine(name: str) -> bool:
    return name == "weir_server.engine" or name.startswith("weir_server.engine.")


def _package_of(path: Path) -> str:
    """The dotted package a module file of weir_server.executor belongs to."""
    parts = path.relative_to(Path(weir_server.executor.__file__).parent).parent.parts
    return ".".join(("weir_server", "executor", *parts))
