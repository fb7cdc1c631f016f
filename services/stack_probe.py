"""Where one thread of a service process spends its time, by Python function, for ``mosaic bench service``; off
unless asked for.

A worker's engine thread is the service's bottleneck once the GPU is busy, and its time by part (ingest, questions,
upkeep) does not say which code inside a part costs it. With ``MOSAIC_STACKS_DIR`` set in a process's environment,
``start(role, thread)`` starts a daemon thread that looks at ``thread``'s Python stack every ``SAMPLE_S``
(``sys._current_frames``). Each look is weighted by the time since the previous one, so a C call that holds the GIL
and so delays the sampler (a kernel launch waiting for room in a full queue, for one) still counts at its length, to
the line that made it or the next one. Once a second it replaces ``<dir>/stacks-<role>-<pid>.json``
with the totals so far, in seconds:

    {"t": 1764612000.0, "sampled_s": 61.2, "self": {"ingest_pass.py:_place_frame:240": 1.4, ...},
     "inclusive": {"ingest_pass.py:_place_frame": 9.1, ...}}

``self`` is by innermost line (where the thread was), ``inclusive`` by function anywhere on the stack (what it was
inside). ``busiest(before, after)`` turns two such snapshots into the top functions between them, in seconds per
second. Python-level only: time inside one C call is not split further.

With ``since_chance`` (a worker passes its engine loop's ``questions.seconds_since_chance``), the looks taken while
the thread has had no chance to start a question for ``SLOW_STRETCH_S`` or more are also counted apart, under
``slow_sampled_s``, ``slow_self`` and ``slow_inclusive``: what the thread is doing while a question that arrived would
still be waiting. With ``chance_kind`` as well (the engine loop's ``questions.last_chance_kind``), they are split by
the kind of chance the stretch began at, under ``slow_after`` (seconds per kind) and ``slow_after_self``
(``"<kind> | <line>"``): a call's start, a pause inside it, the loop.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from services import gc_watch
from services.jsonl_files import claim_file, newest_line

log = logging.getLogger(__name__)
ENV_DIR = "MOSAIC_STACKS_DIR"
SAMPLE_S = 0.005
SLOW_STRETCH_S = 0.1
WRITE_EVERY_S = 1.0
TOP = 40
_started: set[str] = set()


def start(
    role: str,
    thread: threading.Thread,
    since_chance: Callable[[], float] | None = None,
    chance_kind: Callable[[], str] | None = None,
) -> Path | None:
    """Starts sampling ``thread`` as ``role`` when ``MOSAIC_STACKS_DIR`` is set; returns the file, else None."""
    path = claim_file(ENV_DIR, "stacks", role, _started, suffix=".json")
    if path is None:
        return None
    stop = threading.Event()  # never set: the probe lives as long as the process
    gc_watch.watch()
    threading.Thread(
        target=sample,
        args=(thread, path, stop),
        kwargs={"since_chance": since_chance, "chance_kind": chance_kind},
        name=f"stack-probe-{role}",
        daemon=True,
    ).start()
    log.info("sampling the stack of %s's thread %s into %s", role, thread.name, path)
    return path


def read_latest(directory: Path, role: str) -> dict | None:
    """The newest snapshot written by any process of ``role`` in ``directory``."""
    return newest_line(directory, f"stacks-{role}-*.json")


def busiest(before: dict | None, after: dict | None, top: int = TOP) -> dict | None:
    """Between two snapshots of one process: the ``top`` lines (``self``) and functions (``inclusive``) by seconds
    per second sampled, highest first, and the seconds sampled; the same of the slow stretches (module doc) where the
    snapshots count them. None without two snapshots."""
    if before is None or after is None or after["sampled_s"] <= before["sampled_s"]:
        return None
    window_s = after["sampled_s"] - before["sampled_s"]

    def ranked(kind: str) -> list[tuple[str, float]]:
        grown = {k: v - before.get(kind, {}).get(k, 0.0) for k, v in after[kind].items()}
        return [(k, v / window_s) for k, v in sorted(grown.items(), key=lambda kv: -kv[1])[:top] if v > 0]

    busiest = {"window_s": window_s, "self": ranked("self"), "inclusive": ranked("inclusive")}
    if "slow_sampled_s" in after:
        busiest["slow_s_per_s"] = (after["slow_sampled_s"] - before.get("slow_sampled_s", 0.0)) / window_s
        busiest["slow_self"], busiest["slow_inclusive"] = ranked("slow_self"), ranked("slow_inclusive")
    if "gc" in after:
        busiest["gc"] = gc_watch.grown(before.get("gc"), after["gc"], window_s)
    if "slow_after" in after:
        grown = {k: (v - before.get("slow_after", {}).get(k, 0.0)) / window_s for k, v in after["slow_after"].items()}
        busiest["slow_after"] = sorted(((k, v) for k, v in grown.items() if v > 0), key=lambda kv: -kv[1])
        busiest["slow_after_self"] = ranked("slow_after_self")
    return busiest


def sample(
    thread: threading.Thread,
    path: Path,
    stop: threading.Event,
    *,
    keep_all: bool = False,
    since_chance: Callable[[], float] | None = None,
    chance_kind: Callable[[], str] | None = None,
) -> None:
    """Samples ``thread`` and writes snapshots (module doc) until ``stop`` is set or the thread ends, and once more;
    with ``keep_all`` each snapshot is appended to ``path`` as a line instead of replacing the previous one; with
    ``since_chance``, the slow stretches are also counted apart, and with ``chance_kind`` split by their start."""
    totals = {"sampled_s": 0.0, "self": defaultdict(float), "inclusive": defaultdict(float)}
    slow = {"sampled_s": 0.0, "self": defaultdict(float), "inclusive": defaultdict(float)}
    if since_chance is not None:
        totals.update(slow_sampled_s=0.0, slow_self=slow["self"], slow_inclusive=slow["inclusive"])
        if chance_kind is not None:
            totals.update(slow_after=defaultdict(float), slow_after_self=defaultdict(float))
    written = previous = time.perf_counter()
    while not stop.is_set() and thread.is_alive():
        time.sleep(SAMPLE_S)
        now = time.perf_counter()
        frame = sys._current_frames().get(thread.ident)
        if frame is not None:
            add(totals, frame, now - previous)
            if since_chance is not None and since_chance() >= SLOW_STRETCH_S:
                add(slow, frame, now - previous)
                totals["slow_sampled_s"] = slow["sampled_s"]
                if chance_kind is not None:
                    kind = chance_kind()
                    totals["slow_after"][kind] += now - previous
                    totals["slow_after_self"][f"{kind} | {_line(frame)}"] += now - previous
        previous = now
        if now - written >= WRITE_EVERY_S:
            written = now
            _write(path, totals, keep_all)
    _write(path, totals, keep_all)


def add(totals: dict, frame, weight_s: float) -> None:
    """Counts ``weight_s`` to the innermost line of ``frame``'s stack and once to each function on it."""
    totals["sampled_s"] += weight_s
    totals["self"][_line(frame)] += weight_s
    seen = set()
    while frame is not None:
        code = frame.f_code
        key = f"{os.path.basename(code.co_filename)}:{code.co_name}"
        if key not in seen:
            seen.add(key)
            totals["inclusive"][key] += weight_s
        frame = frame.f_back


def _line(frame) -> str:
    code = frame.f_code
    return f"{os.path.basename(code.co_filename)}:{code.co_name}:{frame.f_lineno}"


def _write(path: Path, totals: dict, keep_all: bool = False) -> None:
    line = json.dumps({"t": time.time(), **totals, "gc": gc_watch.snapshot()}) + "\n"
    staged = path.with_suffix(".tmp")
    try:
        if keep_all:
            with path.open("a") as out:
                out.write(line)
        else:
            staged.write_text(line)
            os.replace(staged, path)
    except OSError:  # a full disk or a removed folder must not end the probe for good
        log.warning("stack probe snapshot for %s failed", path, exc_info=True)
