"""``mosaic bench engine`` with its main thread's stack sampled (``services.stack_probe``), for comparing where the
engine alone spends its host time with where a service worker's engine thread does (``mosaic bench service
--stack-probe``):

    python -m bench.sampled_engine STACKS.jsonl --scenarios B --b-modes cluster --cameras 128 --out B128.json

Appends the probe's totals so far to STACKS.jsonl once a second, each line with its time (``t``). Scenario B's
results give the wall-clock span of each row's ingest-only half (``ingest_only_unix_s``), so
``services.stack_probe.busiest`` of the first and last lines inside it is that half alone, without the model's
loading and the warm-up pass.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from mosaic_core.bench.engine import main as bench_engine
from services import stack_probe


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    stop = threading.Event()
    sampler = threading.Thread(
        target=stack_probe.sample,
        args=(threading.main_thread(), Path(argv[0]), stop),
        kwargs={"keep_all": True},
        name="stack-probe",
    )
    sampler.start()
    try:
        return bench_engine(argv[1:])
    finally:
        stop.set()
        sampler.join(5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
