"""The house's arrows, read from the source: callbacks -> cams and train -> cams, never back; cams imports neither
Lightning nor W&B; and no two modules import each other, directly or around a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"package": "cubcam", "cams": "cubcam.cams", "callbacks": "cubcam.callbacks", "train": "cubcam.train"}


def module_imports() -> dict[str, set[str]]:
    """Each cubcam module's top-level imports (module names; ``from a import b`` counts a.b where that is one)."""
    found: dict[str, set[str]] = {}
    for folder, package in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = [part for part in path.relative_to(REPO / folder).with_suffix("").parts if part != "__init__"]
            names: set[str] = set()
            for node in ast.parse(path.read_text()).body:  # top level only: a function's import runs when called
                if isinstance(node, ast.Import):
                    names |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            found[".".join([package, *parts])] = names
    return found


def test_the_arrows_point_one_way() -> None:
    imports = module_imports()
    for module, names in imports.items():
        if module.startswith("cubcam.cams"):
            outside = {n for n in names if n.split(".")[0] in ("pytorch_lightning", "lightning", "wandb")}
            assert not outside, (module, outside)
            assert not {n for n in names if n.startswith(("cubcam.callbacks", "cubcam.train"))}, module
        if module.startswith("cubcam.callbacks"):
            assert not {n for n in names if n.startswith("cubcam.train")}, module


def test_no_module_imports_itself_around_a_circle() -> None:
    """Packages' ``__init__`` files re-export their modules and are left out: a circle through one is Python's
    ordinary package import, not two modules that need each other."""
    imports = module_imports()
    packages = set(PACKAGES.values()) | {"cubcam.train.data", "cubcam.train.inspection"}
    graph = {m: {n for n in names if n in imports and n not in packages and n != m} for m, names in imports.items()}
    path: list[str] = []
    state: dict[str, str] = {}

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                pytest.fail("import circle: " + " -> ".join([*path[path.index(other) :], other]))
            if other not in state:
                visit(other)
        state[module] = "done"
        path.pop()

    for module in sorted(graph):
        if module not in packages and module not in state:
            visit(module)
