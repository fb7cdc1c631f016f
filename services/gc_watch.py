"""The worker's garbage collections: its start-up heap frozen out of them, and their count and time watched.

A worker holds millions of objects that live as long as it does (Ray's, torch's and transformers' modules, the
model's). CPython's full (generation 2) collection walks all of them with the GIL held, and the engine thread, which
queues the GPU's work from Python, stops for as long as that takes. ``freeze_start_up_heap`` moves them to the
permanent generation that collections skip (``gc.freeze``, as CPython's docs advise for long-running processes), and
times one full collection before and after, so the log (and the stack probe's file) says what it saved. A worker
calls it through ``freeze_once``, so a process that builds several (a test's) freezes once.

``watch()`` counts each generation's collections, their seconds and those over ``LONG_S`` through ``gc.callbacks``;
the stack probe installs it and writes ``snapshot()`` with its own, so ``mosaic bench service --stack-probe`` reports
collections per step.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)
LONG_S = 0.05
_times: dict[int, list[float]] = {}  # generation -> [collections, seconds, collections over LONG_S]
_started: dict[int, float] = {}
_frozen: dict[str, float] = {}


def freeze_start_up_heap(label: str) -> dict[str, float]:
    """Collects, freezes what is left, collects again; returns (and logs) the objects frozen and the two full
    collections' seconds."""
    started = time.perf_counter()
    gc.collect()
    before_s = time.perf_counter() - started
    gc.freeze()
    started = time.perf_counter()
    gc.collect()
    after_s = time.perf_counter() - started
    _frozen.update(objects=gc.get_freeze_count(), full_collection_before_s=before_s, full_collection_after_s=after_s)
    log.info(
        "%s: froze %d start-up objects out of garbage collection; a full collection took %.1f ms before, %.1f after",
        label, _frozen["objects"], before_s * 1000, after_s * 1000,
    )  # fmt: skip
    return dict(_frozen)


def freeze_once(label: str) -> dict[str, float] | None:
    """``freeze_start_up_heap`` for the first worker of a process (an in-process test may build several); None
    after that."""
    return None if _frozen else freeze_start_up_heap(label)


def watch() -> None:
    """Starts counting collections (once per process)."""
    if _on_collection not in gc.callbacks:
        gc.callbacks.append(_on_collection)


def snapshot() -> dict:
    """``{"by_generation": {"0": [count, seconds, over LONG_S], ...}, "frozen": {...}}`` so far."""
    return {"by_generation": {str(g): list(v) for g, v in sorted(_times.items())}, "frozen": dict(_frozen)}


def grown(before: dict | None, after: dict | None, window_s: float) -> dict | None:
    """Per generation between two snapshots: collections, seconds per second, collections over ``LONG_S``."""
    if after is None or window_s <= 0:
        return None
    earlier = (before or {}).get("by_generation", {})
    out = {}
    for gen, (count, seconds, long) in after["by_generation"].items():
        c0, s0, l0 = earlier.get(gen, (0, 0.0, 0))
        out[gen] = {"collections": count - c0, "s_per_s": (seconds - s0) / window_s, "over_long": long - l0}
    return {"by_generation": out, "frozen": after.get("frozen", {})}


def _on_collection(phase: str, info: dict) -> None:
    generation = info["generation"]
    if phase == "start":
        _started[generation] = time.perf_counter()
        return
    began = _started.pop(generation, None)
    if began is None:
        return
    took = time.perf_counter() - began
    entry = _times.setdefault(generation, [0, 0.0, 0])
    entry[0] += 1
    entry[1] += took
    entry[2] += took > LONG_S
