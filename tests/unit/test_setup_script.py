"""``scripts/setup.sh`` refuses a Python older than the project's ``requires-python`` before it installs anything,
instead of failing on the project only after torch is in."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run_setup_with(python: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    copy = tmp_path / "repo"  # a copy, so that a script that went on would touch nothing of this checkout
    (copy / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", copy / "scripts" / "setup.sh")
    return subprocess.run(
        ["bash", str(copy / "scripts" / "setup.sh")],
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(python), "MOSAIC_NO_APT": "1"},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_an_older_python_is_refused_before_anything_is_installed(tmp_path):
    old_python = tmp_path / "python3.10"
    old_python.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Python 3.10.12" && exit 0\nexit 1\n')
    old_python.chmod(0o755)

    run = _run_setup_with(old_python, tmp_path)

    assert run.returncode == 2, run.stdout + run.stderr
    assert "needs Python 3.11 or newer" in run.stderr and "Python 3.10.12" in run.stderr
    assert not (tmp_path / "repo" / ".venv").exists()


def test_a_missing_interpreter_is_named(tmp_path):
    run = _run_setup_with(tmp_path / "no-such-python", tmp_path)

    assert run.returncode == 2 and "no-such-python is not found" in run.stderr, run.stderr
