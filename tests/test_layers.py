"""The rooms of edgert/ show the layers, and imports only go down them:

    base (bundle, model_config, config, sampling_params, outputs)
      < core < {runner, sample, text} < engine < serve < tools

A module may import base modules, its own room, and rooms of a lower level; never a room beside
or above it. `client` stands alone (it talks HTTP, it imports nothing of edgert), and no module of
edgert imports the exporter, torch, transformers or optimum (they are not on a board)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "edgert"
BASE = {"bundle", "model_config", "config", "sampling_params", "outputs"}
LEVEL = {"core": 1, "runner": 2, "sample": 2, "text": 2, "engine": 3, "serve": 4, "tools": 5}
HOST_ONLY = ("export", "torch", "transformers", "optimum")


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py"))


def _room(parts: tuple[str, ...]) -> str:
    """'edgert.core.scheduler' -> 'core'; 'edgert.config' -> 'config'."""
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "edgert":  # from edgert import x: x is the module
                found += [(f"edgert.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((node.module, node.lineno))
    return found


def test_every_module_lives_in_a_known_room():
    for path in _modules():
        rel = path.relative_to(ROOT.parent).with_suffix("").parts
        if len(rel) == 2:  # a top-level module
            name = rel[1]
            assert name in BASE | {"__init__", "__main__", "client"}, (
                f"{path}: new top-level module; put it in a room (or add it to the base)")
        else:
            assert rel[1] in LEVEL, f"{path}: unknown room {rel[1]!r}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_imports_only_go_down(path: Path):
    rel = path.relative_to(ROOT.parent).with_suffix("").parts
    here = rel[1] if len(rel) > 2 else None  # None: a top-level module
    for name, line in _imports(path):
        top = name.split(".")[0]
        assert top not in HOST_ONLY, f"{path}:{line} imports {name}, which is not on a board"
        if top != "edgert":
            continue
        parts = tuple(name.split("."))
        target = _room(parts)
        if rel[-1] == "client" and len(rel) == 2:
            pytest.fail(f"{path}:{line}: the client imports nothing of edgert ({name})")
        if target in ("", "__main__") and here is None:
            continue  # the package itself / __main__ importing the CLI entry
        if target in BASE or target == "":
            continue
        if target == "client":
            assert here == "tools", f"{path}:{line}: only tools use the client"
            continue
        if here is None:
            if rel[-1] == "__main__" and target == "tools":
                continue
            pytest.fail(f"{path}:{line}: base module imports the {target} room ({name})")
        assert target in LEVEL, f"{path}:{line}: {name} is not a room"
        assert target == here or LEVEL[target] < LEVEL[here], (
            f"{path}:{line}: the {here} room imports {name}, of the {target} room, which is "
            f"{'beside' if LEVEL[target] == LEVEL[here] else 'above'} it")
