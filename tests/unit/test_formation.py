"""Online cluster formation: join/start decisions, ids, and the merge/split helpers."""

from __future__ import annotations

import pytest

from mosaic_core.bookkeeping import FORMATION_REASONS, ClusterFormer, FormationConfig, FormationDecision
from mosaic_core.errors import (
    ConfigError,
    InvalidArgumentError,
    StateError,
    TimestampOrderError,
    UnknownClusterError,
)

CFG = FormationConfig(min_similarity=0.85, min_cohesion=0.8, max_tokens=400, max_gap_s=5.0)


def feed(former: ClusterFormer, frames: list[tuple[float, int, float | None, float | None]]) -> list[str]:
    """Decide and commit each (timestamp_s, num_tokens, similarity, cohesion_after); returns the reasons."""
    reasons = []
    for timestamp_s, num_tokens, similarity, cohesion in frames:
        decision = former.decide(
            timestamp_s=timestamp_s, num_tokens=num_tokens, similarity=similarity, cohesion_after=cohesion
        )
        assert decision.reason in FORMATION_REASONS
        assert decision.join == (decision.reason in ("similar", "young"))
        index = len(reasons)
        former.commit(decision, frame_index=index, timestamp_s=timestamp_s, num_tokens=num_tokens)
        reasons.append(decision.reason)
    return reasons


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_similarity": 1.5}, "min_similarity must be a cosine"),
        ({"min_cohesion": -2.0}, "min_cohesion must be a cosine"),
        ({"min_similarity": float("nan")}, "min_similarity"),
        ({"max_tokens": 0}, "max_tokens must be an int > 0"),
        ({"max_tokens": 10.0}, "max_tokens must be an int > 0"),
        ({"max_gap_s": 0.0}, "max_gap_s must be > 0"),
        ({"min_frames_before_split": 0}, "min_frames_before_split must be an int >= 1"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FormationConfig(**kwargs)


# Each row: frames as (timestamp_s, num_tokens, similarity, cohesion_after), expected reasons, cluster sizes.
DECISION_TABLE = [
    (
        "similar frames join",
        [(0, 100, None, None), (1, 100, 0.95, 0.9), (2, 100, 0.9, 0.85)],
        "first similar similar",
        [3],
    ),
    (
        "dissimilar starts new",
        [(0, 100, None, None), (1, 100, 0.5, 0.9), (2, 100, 0.9, 0.9)],
        "first dissimilar similar",
        [1, 2],
    ),
    ("threshold is inclusive", [(0, 100, None, None), (1, 100, 0.85, 0.8)], "first similar", [2]),
    ("incoherent starts new", [(0, 100, None, None), (1, 100, 0.95, 0.7)], "first incoherent", [1, 1]),
    ("cohesion may be skipped", [(0, 100, None, None), (1, 100, 0.95, None)], "first similar", [2]),
    (
        "size cap",
        [(0, 200, None, None), (1, 200, 0.99, 0.99), (2, 1, 0.99, 0.99)],
        "first similar full",
        [2, 1],
    ),
    (
        "gap cap",
        [(0, 100, None, None), (5, 100, 0.99, 0.99), (10.5, 100, 0.99, 0.99)],
        "first similar gap",
        [2, 1],
    ),
    ("gap needs no similarity", [(0, 100, None, None), (9, 100, None, None)], "first gap", [1, 1]),
]


@pytest.mark.parametrize(("name", "frames", "reasons", "sizes"), DECISION_TABLE, ids=[r[0] for r in DECISION_TABLE])
def test_decisions(name: str, frames: list, reasons: str, sizes: list[int]) -> None:
    former = ClusterFormer("cam", CFG)
    assert feed(former, frames) == reasons.split()
    records = former.records()
    assert [r.num_frames for r in records] == sizes
    assert sum(r.num_tokens for r in records) == sum(f[1] for f in frames)
    assert all(r.num_tokens <= CFG.max_tokens for r in records)
    assert [r.sealed for r in records] == [True] * (len(records) - 1) + [False]
    assert [i for r in records for i in r.frame_indices] == list(range(len(frames)))


def test_young_cluster_takes_dissimilar_frames() -> None:
    former = ClusterFormer("cam", FormationConfig(min_frames_before_split=3, max_tokens=400))
    reasons = feed(former, [(0, 10, None, None), (1, 10, 0.1, 0.1), (2, 10, None, None), (3, 10, 0.1, 0.9)])
    assert reasons == ["first", "young", "young", "dissimilar"]
    assert [r.num_frames for r in former.records()] == [3, 1]


def test_decide_does_not_commit_and_ids_are_stable() -> None:
    former = ClusterFormer("cam", CFG)
    first = former.decide(timestamp_s=0.0, num_tokens=10, similarity=None, cohesion_after=None)
    again = former.decide(timestamp_s=0.0, num_tokens=10, similarity=None, cohesion_after=None)
    assert first == again == FormationDecision(join=False, cluster_id="cam/c000000", reason="first")
    assert former.records() == [] and former.open_cluster() is None
    record = former.commit(first, frame_index=7, timestamp_s=0.0, num_tokens=10)
    assert (record.cluster_id, record.frame_indices, record.start_s, record.end_s) == (
        "cam/c000000",
        [7],
        0.0,
        0.0,
    )
    with pytest.raises(StateError, match="stale decision"):
        former.commit(first, frame_index=8, timestamp_s=1.0, num_tokens=10)
    split = former.decide(timestamp_s=1.0, num_tokens=10, similarity=0.1, cohesion_after=None)
    assert split.cluster_id == "cam/c000001"
    former.commit(split, frame_index=8, timestamp_s=1.0, num_tokens=10)
    with pytest.raises(StateError, match="stale decision"):
        former.commit(FormationDecision(True, "cam/c000000", "similar"), frame_index=9, timestamp_s=2.0, num_tokens=1)


def test_seal_makes_the_next_frame_start_a_cluster() -> None:
    former = ClusterFormer("cam", CFG)
    assert former.seal() is None
    feed(former, [(0, 10, None, None)])
    sealed = former.seal()
    assert sealed is not None and sealed.sealed and former.open_cluster() is None
    decision = former.decide(timestamp_s=1.0, num_tokens=10, similarity=0.99, cohesion_after=0.99)
    assert (decision.join, decision.reason, decision.cluster_id) == (False, "first", "cam/c000001")


def test_a_restored_former_rewinds_to_its_newest_sealed_frame() -> None:
    first = ClusterFormer("cam", CFG)
    feed(first, [(0.0, 10, None, None), (1.0, 10, 0.99, 0.99), (7.0, 10, None, None)])  # c1 starts at a gap
    sealed = first.records()[0]
    sealed.sealed = True
    # Restored after a crash that lost c1's frame at 7.0 and more after it, up to 9.0: its last frame time.
    former = ClusterFormer("cam", CFG)
    former.adopt([sealed], next_number=64, last_frame_index=40, last_timestamp_s=9.0)
    with pytest.raises(TimestampOrderError, match=r"not after 9\.0s"):
        former.decide(timestamp_s=7.0, num_tokens=10, similarity=None, cohesion_after=None)
    assert former.rewind_to_sealed() == 1.0
    decision = former.decide(timestamp_s=7.0, num_tokens=10, similarity=None, cohesion_after=None)
    record = former.commit(decision, frame_index=41, timestamp_s=7.0, num_tokens=10)
    assert (record.cluster_id, record.frame_timestamps_s) == ("cam/c000064", [7.0])  # a new id, the lost frame's time
    with pytest.raises(InvalidArgumentError, match="frame index 40 after 41"):
        former.commit(former.decide(timestamp_s=8.0, num_tokens=10, similarity=0.99, cohesion_after=0.99),
                      frame_index=40, timestamp_s=8.0, num_tokens=10)  # fmt: skip
    with pytest.raises(StateError, match="open cluster"):
        former.rewind_to_sealed()
    assert ClusterFormer("cam", CFG).rewind_to_sealed() is None


def test_frame_validation() -> None:
    former = ClusterFormer("cam", CFG)
    feed(former, [(1.0, 10, None, None)])
    kwargs = {"similarity": 0.9, "cohesion_after": 0.9}
    with pytest.raises(TimestampOrderError, match=r"not after 1\.0s"):
        former.decide(timestamp_s=1.0, num_tokens=10, **kwargs)
    with pytest.raises(InvalidArgumentError, match=r"1\.\.400 tokens"):
        former.decide(timestamp_s=2.0, num_tokens=401, **kwargs)
    with pytest.raises(InvalidArgumentError, match=r"1\.\.400 tokens"):
        former.decide(timestamp_s=2.0, num_tokens=0, **kwargs)
    with pytest.raises(InvalidArgumentError, match="similarity must be finite"):
        former.decide(timestamp_s=2.0, num_tokens=10, similarity=float("nan"), cohesion_after=None)
    with pytest.raises(InvalidArgumentError, match="similarity is needed"):
        former.decide(timestamp_s=2.0, num_tokens=10, similarity=None, cohesion_after=None)
    decision = former.decide(timestamp_s=2.0, num_tokens=10, **kwargs)
    with pytest.raises(InvalidArgumentError, match="frame index 0 after 0"):
        former.commit(decision, frame_index=0, timestamp_s=2.0, num_tokens=10)
    with pytest.raises(InvalidArgumentError, match="overflow"):
        former.commit(decision, frame_index=1, timestamp_s=2.0, num_tokens=391)


def test_records_are_copies() -> None:
    former = ClusterFormer("cam", CFG)
    feed(former, [(0, 10, None, None)])
    copy = former.records()[0]
    copy.frame_indices.append(99)
    copy.num_tokens = 0
    assert former.records()[0].frame_indices == [0] and former.open_cluster().num_tokens == 10


def build_three(max_tokens: int = 400) -> ClusterFormer:
    former = ClusterFormer("cam", FormationConfig(max_tokens=max_tokens))
    frames = [(0, 50, None, None), (1, 50, 0.9, 0.9), (2, 60, 0.1, 0.9), (3, 70, 0.1, 0.9), (4, 80, 0.9, 0.9)]
    feed(former, frames)
    former.seal()
    return former  # c000000: frames 0,1; c000001: frame 2; c000002: frames 3,4


def test_merge_records() -> None:
    former = build_three()
    a, b, c = former.records()
    merged = former.merge_records(a, b)
    assert merged.cluster_id == "cam/c000003" and merged.sealed
    assert (merged.frame_indices, merged.num_tokens, merged.start_s, merged.end_s) == ([0, 1, 2], 160, 0, 2)
    assert merged.frame_num_tokens == [50, 50, 60]
    assert [r.cluster_id for r in former.records()] == ["cam/c000003", "cam/c000002"]
    with pytest.raises(UnknownClusterError):
        former.merge_records(a, c)
    with pytest.raises(InvalidArgumentError, match="not adjacent"):
        former.merge_records(c, merged)


def test_merge_respects_cap_and_open_clusters() -> None:
    former = build_three(max_tokens=150)
    _, b, c = former.records()
    with pytest.raises(InvalidArgumentError, match="over max_tokens=150"):
        former.merge_records(b, c)
    former = ClusterFormer("cam", CFG)
    feed(former, [(0, 10, None, None), (1, 10, 0.1, None)])
    first, open_rec = former.records()
    with pytest.raises(StateError, match="still open"):
        former.merge_records(first, open_rec)


def test_split_record() -> None:
    former = build_three()
    a, _, c = former.records()
    left, right = former.split_record(c, 4)
    assert (left.cluster_id, right.cluster_id) == ("cam/c000003", "cam/c000004")
    assert (left.frame_indices, left.num_tokens, left.start_s, left.end_s) == ([3], 70, 3, 3)
    assert (right.frame_indices, right.num_tokens, right.start_s, right.end_s) == ([4], 80, 4, 4)
    ids = [r.cluster_id for r in former.records()]
    assert ids == ["cam/c000000", "cam/c000001", "cam/c000003", "cam/c000004"]
    for bad in (0, 5):  # its first frame; a frame it does not hold
        with pytest.raises(InvalidArgumentError, match="cannot split"):
            former.split_record(a, bad)
    with pytest.raises(UnknownClusterError):
        former.split_record(c, 4)


def test_remove_and_unique_ids_after_maintenance() -> None:
    former = build_three()
    a, b, c = former.records()
    removed = former.remove(a.cluster_id)
    assert removed.cluster_id == a.cluster_id
    merged = former.merge_records(b, c)
    left, right = former.split_record(merged, 3)
    ids = [a.cluster_id, b.cluster_id, c.cluster_id, merged.cluster_id, left.cluster_id, right.cluster_id]
    assert len(set(ids)) == len(ids)
    assert [r.frame_indices for r in former.records()] == [[2], [3, 4]]
    with pytest.raises(UnknownClusterError):
        former.get(a.cluster_id)


def test_lookup_by_id_and_the_newest_records_follow_every_change() -> None:
    def agrees(former: ClusterFormer, gone: list[str]) -> None:
        records = former.records_to_read()
        assert all(former.record_to_read(r.cluster_id) is r for r in records)
        assert all(former.record_to_read(cluster_id) is None for cluster_id in gone)
        assert former.newest_to_read(2) == records[-2:] and former.newest_to_read(0) == ()

    former = build_three()
    a, b, c = former.records()
    agrees(former, [])
    merged = former.merge_records(a, b)
    agrees(former, [a.cluster_id, b.cluster_id])
    left, right = former.split_record(merged, 1)
    agrees(former, [merged.cluster_id])
    joined = former.join_records(left, c)
    agrees(former, [left.cluster_id, c.cluster_id])
    former.remove(right.cluster_id)
    agrees(former, [right.cluster_id])
    decision = former.decide(timestamp_s=9, num_tokens=10, similarity=None, cohesion_after=None)
    former.commit(decision, frame_index=9, timestamp_s=9, num_tokens=10)  # a new, open cluster
    agrees(former, [])
    adopted = ClusterFormer("cam", CFG)
    adopted.adopt([former.get(joined.cluster_id)], next_number=9, last_frame_index=4, last_timestamp_s=4.0)
    agrees(adopted, [right.cluster_id])
