"""The history budget: past ``history_budget_bytes`` of records, the clusters sealed first go, across streams."""

from __future__ import annotations

import dataclasses
import time

from mosaic_core.bookkeeping.formation_config import FormationConfig
from mosaic_core.durable.manifest import replay
from mosaic_core.engine.maintenance import merge_clusters
from mosaic_core.engine.results import FrameInput
from tests.engine.engine_helpers import feed, make_engine

STREAMS = ("cam-a", "cam-b")
CLOCKS = ("pushed", "pulled")  # a pushed camera's clock is Unix time, a pulled one's starts at 0


def _feed_side_by_side(engine, frames, *, offset_s: float = 0.0, after_call=None) -> dict[str, float]:
    """Both streams' frames at the same times, a call per two frames each; returns every sealed cluster seen
    (id -> end time)."""
    seen = {}
    for i in range(0, len(frames), 2):
        engine.ingest([FrameInput(sid, t + offset_s, rgb) for t, rgb in frames[i : i + 2] for sid in STREAMS])
        for sid in STREAMS:
            seen |= {c.cluster_id: c.end_s for c in engine.clusters(sid) if c.cluster_id in engine.history.ledger}
        if after_call is not None:
            after_call()
    return seen


def _on_disk(engine, data_dir) -> dict[str, tuple[float, int]]:
    """The journals' clusters: id -> (end time, KV and keyframe bytes)."""
    assert engine.history.store.flush(30)
    return {
        e.cluster_id: (e.end_s, e.num_bytes + sum(k["num_bytes"] for k in e.keyframes))
        for sid in STREAMS
        for e in replay(data_dir / sid).clusters.values()
    }


def test_past_the_budget_the_oldest_clusters_of_every_stream_go(tiny_model, bikes_frames, tmp_path):
    unbounded = make_engine(tiny_model, data_dir=str(tmp_path / "unbounded"))
    for sid in STREAMS:
        unbounded.open_stream(sid, fps=2.0)
    _feed_side_by_side(unbounded, bikes_frames[:24])
    all_bytes = sum(n for _, n in _on_disk(unbounded, tmp_path / "unbounded").values())
    unbounded.close()

    budget = all_bytes // 3
    data_dir = tmp_path / "bounded"
    engine = make_engine(tiny_model, data_dir=str(data_dir), history_budget_bytes=budget)
    for sid in STREAMS:
        engine.open_stream(sid, fps=2.0)
    totals = []
    seen = _feed_side_by_side(
        engine, bikes_frames[:24], after_call=lambda: totals.append(engine.history.ledger.total_bytes)
    )
    on_disk = _on_disk(engine, data_dir)
    kept = {c.cluster_id for sid in STREAMS for c in engine.clusters(sid) if c.cluster_id in on_disk}
    dropped = set(seen) - {c.cluster_id for sid in STREAMS for c in engine.clusters(sid)}
    try:
        assert max(totals) <= budget, f"the records passed the budget after a call: {totals} > {budget}"
        assert sum(n for _, n in on_disk.values()) <= budget
        assert set(on_disk) == kept, "the journals name exactly the clusters the engine keeps"
        assert dropped and engine.history.dropped_for_space == len(dropped)
        assert {cid.split("/")[0] for cid in dropped} == set(STREAMS), "both streams gave up their oldest"
        assert max(seen[c] for c in dropped) <= min(seen[c] for c in kept), "a newer cluster went before an older"
    finally:
        engine.close()

    # A restart with half the budget adopts every record, then drops down to it, the oldest first.
    restarted = make_engine(tiny_model, data_dir=str(data_dir), history_budget_bytes=budget // 2)
    try:
        restored = {r.stream_id: r.num_clusters for r in restarted.restore_streams()}
        assert restarted.history.ledger.total_bytes <= budget // 2
        assert sum(n for _, n in _on_disk(restarted, data_dir).values()) <= budget // 2
        held = {c.cluster_id for sid in STREAMS for c in restarted.clusters(sid)}
        assert held < kept and restored == {sid: sum(c.startswith(f"{sid}/") for c in held) for sid in STREAMS}
        assert max(seen[c] for c in kept - held) <= min(seen[c] for c in held)
    finally:
        restarted.close()


def test_cameras_whose_clocks_differ_give_up_their_oldest_video_alike(tiny_model, bikes_frames, tmp_path):
    """A pushed camera's clock is Unix time and a pulled one's starts at 0: the budget goes by when video was
    sealed, so neither camera loses all its history to the other's clock."""
    engine = make_engine(tiny_model, data_dir=str(tmp_path))
    for sid in CLOCKS:
        engine.open_stream(sid, fps=2.0)
    unix_s = 1.7e9

    def both(frames):
        engine.ingest(
            [FrameInput("pushed", t + unix_s, rgb) for t, rgb in frames]
            + [FrameInput("pulled", t, rgb) for t, rgb in frames]
        )

    try:
        for i in range(0, 20, 2):
            both(bikes_frames[i : i + 2])
        ledger = engine.history.ledger
        before = {
            sid: {c.cluster_id for c in engine.clusters(sid) if c.cluster_id in ledger} for sid in ("pushed", "pulled")
        }
        engine.config = dataclasses.replace(engine.config, history_budget_bytes=ledger.total_bytes // 2)
        both(bikes_frames[20:22])
        kept = {sid: before[sid] & {c.cluster_id for c in engine.clusters(sid)} for sid in before}
        assert all(kept.values()) and all(kept[sid] < before[sid] for sid in before), (before, kept)
    finally:
        engine.close()


def test_a_cluster_a_question_reads_is_passed_over(tiny_model, bikes_frames, tmp_path):
    """Dropping for space skips a pinned cluster, as retention does, and takes the next oldest instead."""
    engine = make_engine(tiny_model, data_dir=str(tmp_path))
    for sid in STREAMS:
        engine.open_stream(sid, fps=2.0)
    try:
        _feed_side_by_side(engine, bikes_frames[:16])
        ledger = engine.history.ledger
        recorded = sorted(
            (c for sid in STREAMS for c in engine.clusters(sid) if c.cluster_id in ledger), key=lambda c: c.end_s
        )
        assert len(recorded) >= 3
        oldest, next_oldest = recorded[0].cluster_id, recorded[1].cluster_id
        engine.tiering.residency.pin(oldest)
        engine.config = dataclasses.replace(engine.config, history_budget_bytes=ledger.total_bytes - 1)
        _feed_side_by_side(engine, bikes_frames[16:18])
        held = {c.cluster_id for sid in STREAMS for c in engine.clusters(sid)}
        assert oldest in held and next_oldest not in held
        assert ledger.total_bytes <= engine.config.history_budget_bytes
        engine.tiering.residency.unpin(oldest)
    finally:
        engine.close()


def test_the_oldest_video_goes_first_after_a_restart_too(tiny_model, bikes_frames, tmp_path):
    """A merge is as old as the oldest cluster it holds, in the journal too: a restart does not rank it by the
    time its record was written, which would make the budget drop newer video first."""
    config = dict(data_dir=str(tmp_path), formation=FormationConfig(max_tokens=96))
    first = make_engine(tiny_model, **config)
    first.open_stream("cam", fps=2.0)
    feed(first, "cam", bikes_frames[:32])
    state = first.stream("cam")
    records = [r for r in state.former.records_to_read() if r.sealed and r.cluster_id not in state.local_cluster_ids()]
    i = next(i for i in range(len(records) - 1) if records[i].num_tokens + records[i + 1].num_tokens <= 96)
    left, right = records[i], records[i + 1]
    later = [r.cluster_id for r in records[i + 2 :]]  # sealed after both, their video later
    assert later
    time.sleep(0.05)
    merged = merge_clusters(first.parts, state, left.cluster_id, right.cluster_id)
    ledger = first.history.ledger
    assert all(ledger.sealed_unix_s(merged) < ledger.sealed_unix_s(c) for c in later)  # older than all of them
    first.checkpoint()
    first.close()

    second = make_engine(tiny_model, **config)
    second.restore_streams()
    ledger = second.history.ledger
    newer = [c for c in later if ledger.sealed_unix_s(c) <= ledger.sealed_unix_s(merged)]
    assert not newer, (
        f"after the restart {merged} (video {left.start_s}-{right.end_s}s) counts as sealed after {newer}, whose "
        "video is later: the history budget now drops those first"
    )
    second.close()
