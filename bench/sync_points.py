"""``mosaic bench engine`` with CUDA's sync debug mode on: every operation where the host waited for the device
without asking to (a pageable copy, ``.item()``, ``.tolist()`` of a device tensor, ``nonzero``), counted by the
Python stack that made it, for finding what keeps the host from running ahead of the device:

    python -m bench.sync_points SYNCS.json --scenarios B --b-modes cluster --cameras 128 --out B128.json

SYNCS.json lists the stacks (the innermost frames of this project's code, innermost last), most frequent first,
each with its count. Each such operation also raises a warning, which costs host time, so the timings of a run
made this way are not measurements. Needs CUDA.
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

from mosaic_core.bench.engine import main as bench_engine

FRAMES_KEPT = 6


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench.sync_points needs CUDA: the sync debug mode watches CUDA operations", file=sys.stderr)
        return 2
    stacks: Counter[tuple[str, ...]] = Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing" not in str(message):
            return
        frames = [
            f for f in traceback.extract_stack()[:-1] if "/mosaic_core/" in f.filename or "/services/" in f.filename
        ]
        stacks[tuple(f"{_short(f.filename)}:{f.lineno} {f.name}" for f in frames[-FRAMES_KEPT:])] += 1

    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.init()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        return bench_engine(argv[1:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
        ranked = [{"count": n, "stack": list(stack)} for stack, n in stacks.most_common()]
        Path(argv[0]).write_text(json.dumps({"total": sum(stacks.values()), "stacks": ranked}, indent=1) + "\n")


def _short(filename: str) -> str:
    for root in ("/mosaic_core/", "/services/"):
        if root in filename:
            return root.strip("/") + "/" + filename.rsplit(root, 1)[1]
    return filename


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
