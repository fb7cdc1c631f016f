"""How long a thread of a service process waits for the GIL, for ``mosaic bench service``; off unless asked for.

A worker's engine thread queues the GPU's work from Python, so any time it waits for the GIL (held by a source
decoding video, a push, Ray) is time the GPU may wait too. Python cannot show that wait directly; this probe
shows what any thread of the process waits. With ``MOSAIC_GIL_DIR`` set in a process's environment,
``start(role)`` starts a daemon thread that sleeps ``SLEEP_S`` again and again. A sleep releases the GIL, so each
wake-up is late by the time the thread waited to take it back, plus the kernel's wake-up delay (tens of
microseconds when the GIL is free). Once a second it appends the totals so far to
``<dir>/gil-<role>-<pid>.jsonl``:

    {"t": 1764612000.0, "wakes": 4812, "late_s": 0.61, "late_over_1ms": 140, "late_max_s": 0.0049}

``wait_share(before, after)`` turns two such lines into the mean lateness per wake-up, the share of wake-ups
more than 1 ms late, and the worst one between them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from services.jsonl_files import claim_file, newest_line

log = logging.getLogger(__name__)
ENV_DIR = "MOSAIC_GIL_DIR"
SLEEP_S = 0.002
WRITE_EVERY_S = 1.0
LATE_MARK_S = 0.001
_started: set[str] = set()


def start(role: str) -> Path | None:
    """Starts probing this process as ``role`` when ``MOSAIC_GIL_DIR`` is set; returns the file, else None."""
    path = claim_file(ENV_DIR, "gil", role, _started)
    if path is None:
        return None
    stop = threading.Event()  # never set: the probe lives as long as the process
    threading.Thread(target=probe, args=(path, stop), name=f"gil-probe-{role}", daemon=True).start()
    log.info("probing the GIL of %s into %s", role, path)
    return path


def read_latest(directory: Path, role: str) -> dict | None:
    """The newest line written by any process of ``role`` in ``directory`` (the newest file wins)."""
    return newest_line(directory, f"gil-{role}-*.jsonl")


def wait_share(before: dict | None, after: dict | None) -> dict | None:
    """Between two lines of one process: mean lateness per wake-up (ms), share of wake-ups over 1 ms late, and the
    latest of them (ms, over the whole run: the maximum is not windowed); None without two lines."""
    if before is None or after is None or after["wakes"] <= before["wakes"]:
        return None
    wakes = after["wakes"] - before["wakes"]
    return {
        "mean_late_ms": 1e3 * (after["late_s"] - before["late_s"]) / wakes,
        "share_over_1ms": (after["late_over_1ms"] - before["late_over_1ms"]) / wakes,
        "max_late_ms_so_far": 1e3 * after["late_max_s"],
    }


def probe(path: Path, stop: threading.Event) -> None:
    """Sleeps, measures and writes lines (module doc) until ``stop`` is set."""
    totals = {"wakes": 0, "late_s": 0.0, "late_over_1ms": 0, "late_max_s": 0.0}
    written = time.monotonic()
    while not stop.is_set():
        asleep = time.perf_counter()
        time.sleep(SLEEP_S)
        late = max(0.0, time.perf_counter() - asleep - SLEEP_S)
        totals["wakes"] += 1
        totals["late_s"] += late
        totals["late_over_1ms"] += late > LATE_MARK_S
        totals["late_max_s"] = max(totals["late_max_s"], late)
        if time.monotonic() - written >= WRITE_EVERY_S:
            written = time.monotonic()
            try:
                with path.open("a") as out:
                    out.write(json.dumps({"t": time.time(), **totals}) + "\n")
            except OSError:  # a full disk or a removed folder must not end the probe for good
                log.warning("GIL probe line for %s failed", path, exc_info=True)
