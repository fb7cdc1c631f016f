"""The files of the probes (``heap_probe`` and ``gil_probe`` append lines, ``stack_probe`` replaces one): which file
a process writes, and the newest line of a set of them."""

from __future__ import annotations

import json
import os
from pathlib import Path


def claim_file(env_dir: str, prefix: str, role: str, started: set[str], suffix: str = ".jsonl") -> Path | None:
    """This process's file for ``role``, ``$env_dir/prefix-role-pid`` + ``suffix``, the first time it is asked for
    and only when the variable ``env_dir`` names a folder (a probe's switch); else None."""
    directory = os.environ.get(env_dir)
    if not directory or role in started:
        return None
    started.add(role)
    return Path(directory) / f"{prefix}-{role}-{os.getpid()}{suffix}"


def newest_line(directory: Path, pattern: str) -> dict | None:
    """The last complete line of the newest file matching ``pattern`` that has one (a line being written is
    skipped); None when there is none."""
    files = sorted(directory.glob(pattern), key=lambda p: p.stat().st_mtime)
    for path in reversed(files):
        for text in reversed(path.read_text().splitlines()):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                continue
    return None
