"""The Python heap of a service process over time, for ``mosaic bench soak``; off unless asked for.

With ``MOSAIC_HEAP_DIR`` set in a process's environment, ``start(role)`` starts ``tracemalloc`` and a daemon
thread that appends one JSON line every ``MOSAIC_HEAP_INTERVAL_S`` seconds (default 30) to
``<dir>/heap-<role>-<pid>.jsonl``:

    {"t": 1764612000.0, "traced_bytes": 81234567, "objects": 412345,
     "growth": [["mosaic_core/engine/ingest_pass.py:166", 1048576, 2048], ...]}

``traced_bytes`` is what Python's allocator holds (tensor storage is not in it); ``objects`` is the number of
objects the garbage collector tracks; ``growth`` lists the ten source lines whose traced bytes grew most since
the baseline, with the growth in bytes and in blocks. The baseline is the first sample taken at least
``MOSAIC_HEAP_BASELINE_S`` seconds (default 0) after start, so that a soak can leave its warm-up (imports, model
load, filling the tiers) out; before it, ``growth`` is empty. tracemalloc slows allocation-heavy code, so this is
for soaks, not for serving.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
import tracemalloc
from pathlib import Path

from services.jsonl_files import claim_file, newest_line

log = logging.getLogger(__name__)
ENV_DIR = "MOSAIC_HEAP_DIR"
ENV_INTERVAL = "MOSAIC_HEAP_INTERVAL_S"
ENV_BASELINE = "MOSAIC_HEAP_BASELINE_S"
TOP_SITES = 10
_started: set[str] = set()


def start(role: str) -> Path | None:
    """Starts sampling this process as ``role`` when ``MOSAIC_HEAP_DIR`` is set; returns the file, else None."""
    path = claim_file(ENV_DIR, "heap", role, _started)
    if path is None:
        return None
    interval_s = float(os.environ.get(ENV_INTERVAL, "30"))
    baseline_s = float(os.environ.get(ENV_BASELINE, "0"))
    tracemalloc.start()
    args = (path, interval_s, baseline_s)
    thread = threading.Thread(target=_sample_forever, args=args, name=f"heap-{role}", daemon=True)
    thread.start()
    return path


def sample_line(baseline: dict[str, tuple[int, int]] | None) -> tuple[dict, dict[str, tuple[int, int]]]:
    """One record of the heap now, with growth against ``baseline`` (None: this sample becomes the baseline).

    The baseline is kept as bytes and blocks per source line, not as a snapshot: a snapshot holds every trace,
    hundreds of MB in a loaded worker, which would show up in the very RSS the soak is watching.
    """
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    sites = {
        f"{_short(stat.traceback[0].filename)}:{stat.traceback[0].lineno}": (stat.size, stat.count)
        for stat in snapshot.statistics("lineno")
    }
    del snapshot
    baseline = sites if baseline is None else baseline
    growth = [
        [site, size - baseline.get(site, (0, 0))[0], count - baseline.get(site, (0, 0))[1]]
        for site, (size, count) in sites.items()
    ]
    growth = sorted(growth, key=lambda g: -g[1])[:TOP_SITES]
    line = {"t": time.time(), "traced_bytes": tracemalloc.get_traced_memory()[0], "objects": len(gc.get_objects())}
    line["growth"] = growth
    return line, baseline


def read_latest(directory: Path, role: str) -> dict | None:
    """The newest line written by any process of ``role`` in ``directory`` (the newest file wins)."""
    return newest_line(directory, f"heap-{role}-*.jsonl")


def _sample_forever(path: Path, interval_s: float, baseline_s: float) -> None:
    baseline, start = None, time.monotonic()
    while True:
        try:
            if baseline is None and time.monotonic() - start < baseline_s:
                line = {"t": time.time(), "traced_bytes": tracemalloc.get_traced_memory()[0]}
                line |= {"objects": len(gc.get_objects()), "growth": []}
            else:
                line, baseline = sample_line(baseline)
            with path.open("a") as out:
                out.write(json.dumps(line) + "\n")
        except Exception:  # a full disk or a removed folder must not end the sampling for good
            log.warning("heap sample for %s failed; trying again in %.0f s", path, interval_s, exc_info=True)
        time.sleep(interval_s)


def _short(filename: str) -> str:
    for marker in ("/site-packages/", "/mosaic_core/", "/services/"):
        if marker in filename:
            head = "" if marker == "/site-packages/" else marker.strip("/") + "/"
            return head + filename.split(marker, 1)[1]
    return filename
