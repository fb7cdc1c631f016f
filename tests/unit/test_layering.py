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
    result = subprocess.run(
        [_tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
