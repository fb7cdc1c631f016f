"""Recurring-scene joins: a completed cluster joins an earlier visit to the same scene, and is then several spans.

Bookkeeping (``ClusterFormer.join_records``, ``ClusterRecord.spans``, ``adopt``) is checked on its own; the engine
is checked end to end on bikes.mp4 played twice: joins happen only when configured, evidence reports each span of
a joined cluster, a planted probe on a recurring scene finds at least what a random choice does, and a new engine
on the same data directory restores the joined cluster with its spans and bytes.
"""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch

from mosaic_core.bookkeeping import ClusterFormer, FormationConfig
from mosaic_core.engine.engine import Engine
from mosaic_core.engine.probes import ENGINE, ProbeRequest, probing
from mosaic_core.errors import ConfigError, InvalidArgumentError
from tests.engine.engine_helpers import SMALL, feed

CFG = FormationConfig(min_similarity=0.85, min_cohesion=0.8, max_tokens=400, max_gap_s=5.0)


def _former_with_visits() -> ClusterFormer:
    """Clusters of frames [0, 1], [2], [3, 4] (50 tokens a frame), all sealed."""
    former = ClusterFormer("cam", CFG)
    for index, (similarity, t) in enumerate([(None, 0.0), (0.9, 1.0), (0.1, 2.0), (0.1, 3.0), (0.9, 4.0)]):
        decision = former.decide(timestamp_s=t, num_tokens=50, similarity=similarity, cohesion_after=None)
        former.commit(decision, frame_index=index, timestamp_s=t, num_tokens=50)
    former.seal()
    return former


def test_join_records_keeps_both_visits_as_spans() -> None:
    former = _former_with_visits()
    first, middle, last = former.records()
    joined = former.join_records(first, last)
    assert joined.cluster_id == "cam/c000003" and joined.sealed
    assert (joined.frame_indices, joined.num_tokens, joined.start_s, joined.end_s) == ([0, 1, 3, 4], 200, 0.0, 4.0)
    assert joined.spans() == [(0.0, 1.0), (3.0, 4.0)]
    assert middle.spans() == [(2.0, 2.0)]
    # The joined cluster takes the earlier one's place; the later one is gone.
    assert [r.cluster_id for r in former.records()] == [joined.cluster_id, middle.cluster_id]
    with pytest.raises(InvalidArgumentError, match="must all come first"):
        former.join_records(middle, joined)


def test_join_respects_the_cap_and_order() -> None:
    former = _former_with_visits()
    first, _, last = former.records()
    with pytest.raises(InvalidArgumentError, match="must all come first"):
        former.join_records(last, first)
    small = ClusterFormer("cam", dataclasses.replace(CFG, max_tokens=150))
    for index, (similarity, t) in enumerate([(None, 0.0), (0.9, 1.0), (0.1, 2.0), (0.1, 3.0), (0.9, 4.0)]):
        decision = small.decide(timestamp_s=t, num_tokens=50, similarity=similarity, cohesion_after=None)
        small.commit(decision, frame_index=index, timestamp_s=t, num_tokens=50)
    small.seal()
    first, _, last = small.records()
    with pytest.raises(InvalidArgumentError, match="over max_tokens=150"):
        small.join_records(first, last)
    with pytest.raises(ConfigError, match="join_min_similarity"):
        FormationConfig(join_min_similarity=1.5)


def test_adopt_takes_joined_records_that_overlap_in_time_but_not_in_frames() -> None:
    former = _former_with_visits()
    first, _, last = former.records()
    former.join_records(first, last)
    records = former.records()
    again = ClusterFormer("cam", CFG)
    again.adopt(records, next_number=former.next_number, last_frame_index=4, last_timestamp_s=4.0)
    assert [r.spans() for r in again.records()] == [[(0.0, 1.0), (3.0, 4.0)], [(2.0, 2.0)]]
    clash = ClusterFormer("cam", CFG)
    twice = [records[0], dataclasses.replace(records[1], frame_indices=[3])]
    with pytest.raises(InvalidArgumentError, match="share no frame"):
        clash.adopt(twice, next_number=former.next_number, last_frame_index=4, last_timestamp_s=4.0)


JOINING = dataclasses.replace(
    SMALL,
    retrieval_budget_tokens=192,
    formation=FormationConfig(max_tokens=96, join_min_similarity=0.99),
)


def _twice(bikes_frames, num_second: int):
    """The 10-second clip, then its first ``num_second`` frames again 10 s later (the same pictures)."""
    return list(bikes_frames) + [(t + 10.0, rgb) for t, rgb in bikes_frames[:num_second]]


def _crc(kv: torch.Tensor) -> int:
    return zlib.crc32(kv.contiguous().cpu().view(torch.uint8).numpy().data)


def test_joins_happen_only_when_configured(tiny_model, bikes_frames):
    frames = _twice(bikes_frames, 16)
    off = Engine(tiny_model, dataclasses.replace(JOINING, formation=FormationConfig(max_tokens=96)))
    off.open_stream("cam")
    feed(off, "cam", frames)
    assert all(len(r.spans()) == 1 for r in off.stream("cam").former.records())


def test_a_looped_clip_joins_reports_every_span_and_restores(tiny_model, bikes_frames, tmp_path):
    engine = Engine(tiny_model, dataclasses.replace(JOINING, data_dir=str(tmp_path)))
    engine.open_stream("cam")
    feed(engine, "cam", _twice(bikes_frames, 16))
    records = engine.stream("cam").former.records()
    joined = [r for r in records if len(r.spans()) > 1]
    assert joined, f"no recurring scene joined: {[(r.cluster_id, r.frame_indices) for r in records]}"
    for record in joined:
        assert record.frame_indices == sorted(record.frame_indices), "KV order is frame order"
        assert min(record.frame_indices) < 40 <= max(record.frame_indices), "a join must bring the two visits together"
        assert engine.tiering.summaries.count(record.cluster_id) == record.num_tokens
    frame_sets = [set(r.frame_indices) for r in records]
    assert sum(len(s) for s in frame_sets) == len(set().union(*frame_sets)), "a frame is in two clusters"

    # A probe planted on both visits of the joined scene: the engine's choice finds at least what chance does, and
    # the evidence reports each visit as its own span, sharing the cluster id.
    target = max(joined, key=lambda r: r.num_tokens)
    first_visit = [f for f in target.frame_indices if f < 40]
    second_visit = [f for f in target.frame_indices if f >= 40]
    request = ProbeRequest(
        span=(first_visit[0], first_visit[-1]),
        recurs_at=((second_visit[0], second_visit[-1]),),
        sweep_scorers=("random",),
    )
    with probing(request):
        answer = engine.answer("cam", "Planted probe.", max_new_tokens=1)
    assert request.span_found[ENGINE] >= request.span_found["random"]
    assert request.span_found[ENGINE] == 1.0, request.span_found
    cited = [(s.start_s, s.end_s) for s in answer.evidence if s.cluster_id == target.cluster_id]
    assert cited == target.spans()
    assert len({s.rank for s in answer.evidence if s.cluster_id == target.cluster_id}) == 1

    kv = {r.cluster_id: _crc(engine.tiering.tiers.read(r.cluster_id)) for r in joined}
    assert engine.history.store.flush(30)
    engine.close()
    again = Engine(tiny_model, dataclasses.replace(JOINING, data_dir=str(tmp_path)))
    again.restore_streams()
    restored = {r.cluster_id: r for r in again.stream("cam").former.records()}
    for record in joined:
        assert restored[record.cluster_id].frame_indices == record.frame_indices
        assert restored[record.cluster_id].spans() == record.spans()
        assert _crc(again.tiering.tiers.read(record.cluster_id)) == kv[record.cluster_id]
    again.close()
