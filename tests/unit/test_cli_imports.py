"""``mosaic --help`` and every command's ``--help`` answer at once: they import no heavy module (torch,
transformers, Ray, gRPC, pydantic, PyAV), and their imports add up to well under a second.

Measured with ``python -X importtime`` (the interpreter's own per-module clock), not with wall time, so a
loaded machine does not make the test flaky."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "mosaic"
HEAVY = ("torch", "transformers", "ray", "grpc", "pydantic", "av", "redis", "prometheus_client")
COMMANDS = [
    (),
    ("ask-video",),
    ("fidelity",),
    ("bench",),
    ("serve",),
    ("demo",),
    ("streams",),
    ("streams", "add"),
    ("streams", "rm"),
    ("streams", "show"),
    ("push",),
    ("query",),
]
_LINE = re.compile(r"import time:\s+\d+ \|\s+(\d+) \|( +)(\S+)")


def import_profile(*args: str) -> tuple[float, set[str]]:
    """(seconds spent importing, modules imported) of ``mosaic ARGS``."""
    entry = [str(SCRIPT)] if SCRIPT.exists() else ["-m", "mosaic_core.cli"]
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *entry, *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    total_us, modules = 0, set()
    for line in result.stderr.splitlines():
        match = _LINE.match(line)
        if match:
            modules.add(match.group(3))
            if len(match.group(2)) == 1:  # top level: its cumulative time includes everything it imported
                total_us += int(match.group(1))
    return total_us / 1e6, modules


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "mosaic")
def test_help_imports_nothing_heavy(command):
    seconds, modules = import_profile(*command, "--help")
    assert not modules & set(HEAVY), f"--help of {command} imported {sorted(modules & set(HEAVY))}"
    assert seconds < 1.0, f"--help of {command} spent {seconds:.2f}s importing"


def test_version_imports_nothing_heavy():
    _, modules = import_profile("--version")
    assert not modules & set(HEAVY)
