"""Import layering and lint, checked as tests so the README's one test command covers them."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL_DIR = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = TOOL_DIR / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; run scripts/setup.sh")
    return found


def test_import_contracts_hold():
    result = subprocess.run(
        [_tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_bookkeeping_never_imports_torch_even_indirectly():
    """Import-linter's contract allows indirect imports, so walk the bookkeeping package's own imports too."""
    for path in (ROOT / "mosaic_core" / "bookkeeping").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"torch", "numpy", "transformers", "triton"}, (path, name)
                if name.startswith("mosaic_core."):
                    assert name.startswith(("mosaic_core.bookkeeping", "mosaic_core.errors")), (path, name)


def test_ruff_is_clean():
    result = subprocess.run([_tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _module_imports(package: Path, prefix: str) -> dict[str, set[str]]:
    """Each module of ``package`` -> the modules of the same package it imports, ``TYPE_CHECKING`` blocks and
    function-level imports included: a cycle hidden behind either is still one to untangle."""
    modules = {f"{prefix}.{path.stem}": path for path in package.glob("*.py") if path.stem != "__init__"}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize("package", ["engine", "memory", "bookkeeping", "kernels", "durable", "model"])
def test_no_import_cycle_inside_a_core_package(package):
    graph = _module_imports(ROOT / "mosaic_core" / package, f"mosaic_core.{package}")
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
