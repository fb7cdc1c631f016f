"""Every frame a watch could see is evaluated exactly once, when recurring-scene joins or merges absorb a cluster
that was never evaluated on its own (tiny preset on the CPU)."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from engine_helpers import SMALL

from mosaic_core.bookkeeping.formation_config import FormationConfig
from mosaic_core.engine.engine import Engine
from mosaic_core.engine.maintenance import merge_clusters
from mosaic_core.engine.results import FrameInput
from services.watches_spec import WatchRecord
from services.watches_worker import WorkerWatches

STREAM = "cam"


class _FullBackgroundQueue:
    def submit_background(self, job) -> bool:
        return False


class _NoAnswers:
    """An engine loop whose background queue is always full: events fire at once, without an answer."""

    questions = _FullBackgroundQueue()

    def post(self, fn, **kwargs):
        raise AssertionError("no watch question is dropped in these tests")


def _watches(engine: Engine) -> WorkerWatches:
    watches = WorkerWatches(engine, _NoAnswers(), retention_s=lambda stream_id: 0.0)
    record = WatchRecord(watch_id="all", question="Is anyone there?", stream_ids=[STREAM], threshold=-1e9,
                         cooldown_s=0.0, max_answer_tokens=2)  # fmt: skip
    watches.set_watches([record.for_worker({})])
    return watches


class _Run:
    """Ingests frames a batch at a time, evaluating the watches after each call as the engine loop does, and
    counts how many events covered each frame (by timestamp)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.watches = _watches(engine)
        self.frames_of: dict[str, list[float]] = {}  # cluster id -> its frames' times (ids are never reused)
        self.covered: Counter[float] = Counter()

    def ingest(self, frames) -> None:
        self.engine.ingest([FrameInput(STREAM, t, rgb) for t, rgb in frames])
        self.after_change()

    def after_change(self) -> None:
        for record in self.engine.stream(STREAM).former.records_to_read():
            self.frames_of[record.cluster_id] = list(record.frame_timestamps_s)
        self.watches.on_ingested([STREAM])
        for event in self.watches.take(0.0).events:
            self.covered.update(t for t in self.frames_of[event.cluster_id] if event.start_s <= t <= event.end_s)

    def restart(self) -> None:
        """A new process's watches over the same history, from the saved watermark."""
        saved = self.watches.watermark_of(STREAM)
        self.watches = _watches(self.engine)
        self.watches.restore_watermark(STREAM, saved)

    def check_each_frame_evaluated_once(self) -> None:
        """The cluster that ends last holds the newest stored frame and may still grow: its frames may or may not
        have been evaluated (some did, as part of a cluster merged into it since); every other frame was."""
        held = self.engine.clusters(STREAM)
        growing = max(held, key=lambda c: c.end_s)
        records = {r.cluster_id: r for r in self.engine.stream(STREAM).former.records_to_read()}
        stored = {t for c in held for t in records[c.cluster_id].frame_timestamps_s}
        due = {t for c in held if c is not growing for t in records[c.cluster_id].frame_timestamps_s}
        assert due, "the run sealed no cluster"
        assert sorted(due - set(self.covered)) == [], "never evaluated"
        assert sorted(set(self.covered) - stored) == [], "events cover frames of no cluster"
        assert {t: n for t, n in self.covered.items() if n > 1} == {}, "evaluated more than once"


@pytest.mark.parametrize("restart_after", [None, 24, 44])
def test_a_cluster_joined_with_an_earlier_visit_is_evaluated_for_its_own_frames(
    tiny_model, bikes_frames, restart_after
):
    """The bikes clip, then its first 16 frames again 10 s later: completed clusters of the second visit join
    clusters of the first, which were evaluated long before."""
    config = dataclasses.replace(
        SMALL, retrieval_budget_tokens=192, formation=FormationConfig(max_tokens=96, join_min_similarity=0.99)
    )
    engine = Engine(tiny_model, config)
    engine.open_stream(STREAM)
    frames = list(bikes_frames) + [(t + 10.0, rgb) for t, rgb in bikes_frames[:16]]
    run = _Run(engine)
    for first in range(0, len(frames), 4):
        if first == restart_after:
            run.restart()
        run.ingest(frames[first : first + 4])
    joined = [r for r in engine.stream(STREAM).former.records_to_read() if len(r.spans()) > 1]
    assert joined, "no recurring-scene join happened: the test no longer covers one"
    run.check_each_frame_evaluated_once()


def test_the_newest_sealed_cluster_merged_before_it_was_evaluated_is_evaluated_once(tiny_model, bikes_frames):
    """A cluster per frame; after each frame the newest cluster holding KV (sealed and whole, but not evaluated: no
    later frame is stored yet) is merged into the one before it, which was evaluated."""
    config = dataclasses.replace(SMALL, formation=FormationConfig(max_tokens=48, min_similarity=1.0))
    engine = Engine(tiny_model, config)
    engine.open_stream(STREAM)
    state = engine.stream(STREAM)
    run = _Run(engine)
    num_merges = 0
    for frame in bikes_frames[:20]:
        run.ingest([frame])
        held = engine.clusters(STREAM)
        in_window = state.local_cluster_ids()
        if len(held) < 2 or held[-1].cluster_id in in_window or held[-1].first_frame != held[-1].last_frame:
            continue
        if held[-2].first_frame == held[-2].last_frame:
            merge_clusters(engine, state, held[-2].cluster_id, held[-1].cluster_id)
            num_merges += 1
            run.after_change()
    assert num_merges >= 3
    run.check_each_frame_evaluated_once()
