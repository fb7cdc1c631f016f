"""The worker's garbage collections: its start-up heap frozen out of them, their count and time watched."""

from __future__ import annotations

import gc

from services import gc_watch


def test_freezing_moves_the_live_heap_out_of_full_collections():
    try:
        frozen = gc_watch.freeze_start_up_heap("test")
        assert frozen["objects"] > 10_000  # pytest's, torch's, this process's modules
        assert gc.get_freeze_count() > 10_000
        assert gc_watch.snapshot()["frozen"] == frozen
        assert gc_watch.freeze_once("test") is None  # a second worker in the process freezes nothing more
    finally:
        gc.unfreeze()


def test_collections_are_counted_per_generation_and_grown_between_snapshots():
    gc_watch.watch()
    gc_watch.watch()  # once per process, however often asked
    assert gc.callbacks.count(gc_watch._on_collection) == 1
    before = gc_watch.snapshot()
    for _ in range(3):
        gc.collect(1)
    gc.collect()
    after = gc_watch.snapshot()
    grown = gc_watch.grown(before, after, window_s=2.0)["by_generation"]
    assert grown["1"]["collections"] >= 3
    assert grown["2"]["collections"] >= 1
    assert grown["2"]["s_per_s"] > 0
    assert gc_watch.grown(None, after, 2.0)["by_generation"]["2"]["collections"] >= grown["2"]["collections"]
    assert gc_watch.grown(before, None, 2.0) is None
