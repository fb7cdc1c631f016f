"""Co-retrieval tracking and merge proposals on constructed question sequences, with the counts in the clusters'
residency records."""

from __future__ import annotations

import pytest

from mosaic_core.bookkeeping import CoRetrievalTracker, MergeProposal, ResidencyManager, Tier, TierBudgets
from mosaic_core.errors import ConfigError, InvalidArgumentError, UnknownClusterError

IDS = ["s/c0", "s/c1", "s/c2", "s/c3"]
SIZES = dict.fromkeys(IDS, 100)


def tracked(*ids: str) -> CoRetrievalTracker:
    """A tracker over a residency manager holding ``ids`` (stream: the part before the slash)."""
    residency = ResidencyManager(TierBudgets(device_bytes=1 << 20, host_bytes=0))
    for cluster_id in ids:
        residency.add(cluster_id, cluster_id.split("/")[0], 1, Tier.DEVICE)
    return CoRetrievalTracker(residency)


def tracker_with(questions: list[list[str]], ids: list[str] = IDS, stream_id: str = "s") -> CoRetrievalTracker:
    tracker = tracked(*ids)
    tracker.set_neighbours(stream_id, ids)
    for retrieved in questions:
        tracker.observe(stream_id, retrieved)
    return tracker


def test_always_co_retrieved_neighbours_are_proposed() -> None:
    tracker = tracker_with([["s/c1", "s/c2"], ["s/c2", "s/c1", "s/c3"], ["s/c1", "s/c2"]])
    proposals = tracker.proposals(max_tokens=400, cluster_tokens=SIZES)
    assert proposals == [
        MergeProposal(
            stream_id="s",
            left_id="s/c1",
            right_id="s/c2",
            joint_fraction=1.0,
            num_questions=3,
            num_tokens=200,
        )
    ]
    assert tracker.num_retrievals("s/c1") == 3 and tracker.num_retrievals("s/c3") == 1
    assert tracker.num_questions("s") == 3
    assert tracker.pair_counts("s/c1", "s/c2") == (3, 3)
    assert tracker.pair_counts("s/c2", "s/c3") == (3, 1)
    assert tracker.pair_counts("s/c0", "s/c2") == (0, 0)  # not adjacent, never tracked


def test_clusters_retrieved_apart_are_not_proposed() -> None:
    tracker = tracker_with([["s/c1"], ["s/c2"], ["s/c1"], ["s/c2"], ["s/c0", "s/c2"]])
    assert tracker.proposals(max_tokens=400, cluster_tokens=SIZES) == []


def test_non_adjacent_clusters_are_not_proposed() -> None:
    tracker = tracker_with([["s/c0", "s/c2"]] * 5)
    assert tracker.proposals(max_tokens=400, cluster_tokens=SIZES) == []


@pytest.mark.parametrize(
    ("num_joint", "num_alone", "min_fraction", "expected"),
    [
        (4, 1, 0.8, True),
        (3, 1, 0.8, False),
        (3, 1, 0.75, True),
        (2, 0, 0.8, False),
    ],  # last: too few questions
)
def test_joint_fraction_threshold(num_joint: int, num_alone: int, min_fraction: float, expected: bool) -> None:
    tracker = tracker_with([["s/c0", "s/c1"]] * num_joint + [["s/c0"]] * num_alone)
    proposals = tracker.proposals(max_tokens=400, cluster_tokens=SIZES, min_joint_fraction=min_fraction)
    assert bool(proposals) == expected
    if proposals:
        assert proposals[0].joint_fraction == pytest.approx(num_joint / (num_joint + num_alone))


def test_size_cap_and_missing_sizes_block_proposals() -> None:
    tracker = tracker_with([["s/c0", "s/c1"]] * 5)
    assert tracker.proposals(max_tokens=199, cluster_tokens=SIZES) == []
    open_left_out = {k: v for k, v in SIZES.items() if k != "s/c1"}
    assert tracker.proposals(max_tokens=400, cluster_tokens=open_left_out) == []
    assert len(tracker.proposals(max_tokens=200, cluster_tokens=SIZES)) == 1


@pytest.mark.parametrize(
    ("questions", "min_fraction", "expected_pairs"),
    [
        # Equal scores: earliest pair first, then the next pair that does not share a cluster with it.
        ([IDS] * 3, 0.8, [("s/c0", "s/c1"), ("s/c2", "s/c3")]),
        # (c1,c2) is co-retrieved every time, its overlapping neighbours only 3 of 4 times: it wins alone.
        ([IDS] * 3 + [["s/c1", "s/c2"]], 0.7, [("s/c1", "s/c2")]),
    ],
)
def test_overlapping_pairs_best_first_without_sharing(
    questions: list[list[str]], min_fraction: float, expected_pairs: list[tuple[str, str]]
) -> None:
    tracker = tracker_with(questions)
    proposals = tracker.proposals(max_tokens=400, cluster_tokens=SIZES, min_joint_fraction=min_fraction)
    assert [(p.left_id, p.right_id) for p in proposals] == expected_pairs


def test_set_neighbours_keeps_surviving_pairs_and_drops_others() -> None:
    tracker = tracker_with([["s/c0", "s/c1", "s/c2"]] * 3)
    tracker.set_neighbours("s", ["s/c0", "s/c1", "s/c3"])  # c2 gone (dropped), c3 now follows c1
    assert tracker.pair_counts("s/c0", "s/c1") == (3, 3)
    assert tracker.pair_counts("s/c1", "s/c2") == (0, 0)
    assert tracker.pair_counts("s/c1", "s/c3") == (0, 0)
    tracker.observe("s", ["s/c1", "s/c3"])
    assert tracker.pair_counts("s/c1", "s/c3") == (1, 1)


def test_counts_end_with_the_records_after_a_merge() -> None:
    tracker = tracker_with([["s/c1", "s/c2"]] * 3)
    residency = tracker._residency
    (proposal,) = tracker.proposals(max_tokens=400, cluster_tokens=SIZES)
    residency.remove(proposal.left_id)
    residency.remove(proposal.right_id)
    assert tracker.num_retrievals("s/c1") == 0 and tracker.pair_counts("s/c1", "s/c2") == (0, 0)
    assert tracker.pair_counts("s/c0", "s/c1") == (0, 0)  # c0 still names c1, which has no record
    assert tracker.proposals(max_tokens=400, cluster_tokens=SIZES, min_questions=1, min_joint_fraction=0.1) == []
    residency.add("s/c4", "s", 1, Tier.DEVICE)
    tracker.set_neighbours("s", ["s/c0", "s/c4", "s/c3"])
    tracker.observe("s", ["s/c4", "s/c3"])
    assert tracker.pair_counts("s/c4", "s/c3") == (1, 1)
    assert tracker.pair_counts("s/c0", "s/c4") == (1, 0)


def test_streams_are_isolated() -> None:
    tracker = tracked("a/c0", "a/c1", "b/c0", "b/c1")
    tracker.set_neighbours("a", ["a/c0", "a/c1"])
    for _ in range(3):
        tracker.observe("a", ["a/c0", "a/c1"])
    tracker.set_neighbours("b", ["b/c0", "b/c1"])
    for _ in range(3):
        tracker.observe("b", ["b/c0", "b/c1"])
    sizes = dict.fromkeys(["a/c0", "a/c1", "b/c0", "b/c1"], 10)
    assert {p.stream_id for p in tracker.proposals(max_tokens=100, cluster_tokens=sizes)} == {"a", "b"}
    assert [p.stream_id for p in tracker.proposals(max_tokens=100, cluster_tokens=sizes, stream_id="b")] == ["b"]
    with pytest.raises(InvalidArgumentError, match="belongs to stream 'a'"):
        tracker.observe("b", ["a/c0"])
    with pytest.raises(InvalidArgumentError, match="belongs to stream 'a'"):
        tracker.set_neighbours("b", ["b/c0", "a/c1"])
    assert tracker.num_questions("b") == 3  # the refused observation counted nothing
    tracker._residency.drop_stream("a")
    tracker.drop_stream("a")
    assert tracker.num_questions("a") == 0 and tracker.num_retrievals("a/c0") == 0
    assert [p.stream_id for p in tracker.proposals(max_tokens=100, cluster_tokens=sizes)] == ["b"]
    with pytest.raises(UnknownClusterError):
        tracker.observe("b", ["a/c0"])  # its record ended with the stream


def test_a_stale_neighbour_does_not_count() -> None:
    """c1 is removed and c2 re-declared after c0: the pair (c0, c2) starts from zero, and a question that
    retrieves c0 alone before the re-declaration counts no pair."""
    tracker = tracker_with([["s/c0", "s/c1"]] * 2)
    tracker._residency.remove("s/c1")
    tracker.observe("s", ["s/c0"])
    assert tracker.pair_counts("s/c0", "s/c1") == (0, 0)
    tracker.set_neighbours("s", ["s/c0", "s/c2", "s/c3"])
    assert tracker.pair_counts("s/c0", "s/c2") == (0, 0)
    assert tracker.num_retrievals("s/c0") == 3


def test_validation() -> None:
    tracker = tracked("x")
    with pytest.raises(InvalidArgumentError, match="duplicate"):
        tracker.set_neighbours("s", ["x", "x"])
    with pytest.raises(ConfigError, match="min_joint_fraction"):
        tracker.proposals(max_tokens=10, cluster_tokens={}, min_joint_fraction=0.0)
    with pytest.raises(ConfigError, match="min_questions"):
        tracker.proposals(max_tokens=10, cluster_tokens={}, min_questions=0)
