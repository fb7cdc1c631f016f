"""The semantic-relevance half of clustering: what questions retrieve together.

Visual coherence (``formation``) cuts a stream where the picture changes, but questions may keep needing two
neighbouring clusters at once (a person walks through two camera views of one scene). Fetching them as one
cluster halves the transfer calls and the summaries to score, so the tracker proposes merging them.

Memory stays bounded: pair statistics are kept only for temporally adjacent clusters of one stream, which
the caller declares with ``set_neighbours``:

    c0 - c1 - c2 - c3        pairs tracked: (c0,c1) (c1,c2) (c2,c3)

For each pair the tracker counts the questions, since the pair became adjacent, that retrieved either
cluster and those that retrieved both; ``joint_fraction = num_joint / num_either``. The counts live in the
clusters' records (the pair's in its left cluster's), so a cluster's counts end when its record does.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mosaic_core.bookkeeping.cluster_residency import CoRetrieval
from mosaic_core.bookkeeping.residency import ResidencyManager
from mosaic_core.errors import ConfigError, InvalidArgumentError


@dataclass(slots=True)
class MergeProposal:
    """Merge ``left_id`` with the cluster right after it, ``right_id``."""

    stream_id: str
    left_id: str
    right_id: str
    joint_fraction: float
    num_questions: int = 0  # questions that retrieved either cluster while they were adjacent
    num_tokens: int = 0  # size of the merged cluster


class CoRetrievalTracker:
    """Counts retrievals per cluster and co-retrievals per adjacent pair, across the streams of one engine.

    The counts are part of each cluster's record (``ClusterResidency.co_retrieval``), so they end with it: a
    merged, split or dropped cluster takes its counts and its pairs along, with no second registry to tell. A
    pair counts only while both its records name each other. The tracker itself keeps each stream's number of
    questions.
    """

    def __init__(self, residency: ResidencyManager) -> None:
        self._residency = residency
        self._num_questions: dict[str, int] = {}

    def set_neighbours(self, stream_id: str, ordered_cluster_ids: Sequence[str]) -> None:
        """Declare a stream's clusters in temporal order; replaces its previous order.

        Statistics of pairs that stay adjacent are kept; those of pairs that no longer are are dropped, and the
        stream's clusters left out have no neighbours. Call it when clusters are sealed, merged, split or dropped.
        """
        if len(set(ordered_cluster_ids)) != len(ordered_cluster_ids):
            raise InvalidArgumentError(f"stream {stream_id!r}: duplicate cluster ids in {list(ordered_cluster_ids)}")
        # Every question calls this with all of a stream's mergeable clusters, so it reads each record once.
        counts_of = {cid: self._residency.co_retrieval(cid) for cid in self._residency.clusters(stream_id)}
        for cluster_id in ordered_cluster_ids:
            if cluster_id not in counts_of:
                self._counts(stream_id, cluster_id)  # raises: untracked, or another stream's
        right_of = dict(itertools.pairwise(ordered_cluster_ids))
        left_of = {right: left for left, right in right_of.items()}
        kept = {
            left for left, right in right_of.items() if counts_of[left].right == right and counts_of[right].left == left
        }
        for cluster_id, counts in counts_of.items():
            if cluster_id not in kept:
                counts.pair_either = counts.pair_joint = 0
            counts.right, counts.left = right_of.get(cluster_id), left_of.get(cluster_id)

    def observe(self, stream_id: str, retrieved_cluster_ids: Sequence[str]) -> None:
        """Record one question's retrieved set (aggregated over layers) on ``stream_id``."""
        retrieved = {cid: self._counts(stream_id, cid) for cid in retrieved_cluster_ids}
        self._num_questions[stream_id] = self._num_questions.get(stream_id, 0) + 1
        lefts: set[str] = set()  # each touched pair, named by its left cluster
        for cluster_id, counts in retrieved.items():
            counts.num_retrievals += 1
            if self._linked(cluster_id, counts.right):
                lefts.add(cluster_id)
            if counts.left is not None and self._linked(counts.left, cluster_id):
                lefts.add(counts.left)
        for left in lefts:
            counts = self._residency.co_retrieval(left)
            counts.pair_either += 1
            counts.pair_joint += left in retrieved and counts.right in retrieved

    def proposals(
        self,
        *,
        max_tokens: int,
        cluster_tokens: Mapping[str, int],
        min_questions: int = 3,
        min_joint_fraction: float = 0.8,
        stream_id: str | None = None,
    ) -> list[MergeProposal]:
        """Adjacent pairs worth merging, best first, no cluster in two proposals.

        Args:
            max_tokens: the merged cluster's size cap (the formation cap).
            cluster_tokens: size in tokens of every cluster that may take part. Leave out the open cluster
                and any cluster that must not change (being fetched, being dropped): pairs with a member
                missing here are not proposed.
            min_questions: fewest questions that retrieved either cluster before a pair is judged.
            min_joint_fraction: smallest share of those questions that must have retrieved both.
            stream_id: only this stream's pairs; None for all.
        """
        if not 0.0 < min_joint_fraction <= 1.0:
            raise ConfigError(f"min_joint_fraction must be in (0, 1], got {min_joint_fraction}")
        if min_questions < 1 or max_tokens < 1:
            raise ConfigError(f"min_questions and max_tokens must be >= 1, got {min_questions}, {max_tokens}")
        candidates: list[MergeProposal] = []
        for left in self._residency.clusters(stream_id):
            counts = self._residency.co_retrieval(left)
            right = counts.right
            if counts.pair_either < min_questions or not self._linked(left, right):
                continue
            if left not in cluster_tokens or right not in cluster_tokens:
                continue
            fraction = counts.pair_joint / counts.pair_either
            num_tokens = cluster_tokens[left] + cluster_tokens[right]
            if fraction >= min_joint_fraction and num_tokens <= max_tokens:
                pair_stream = self._residency.stream_of(left)
                candidates.append(MergeProposal(pair_stream, left, right, fraction, counts.pair_either, num_tokens))
        candidates.sort(key=lambda p: (-p.joint_fraction, -p.num_questions, p.stream_id, p.left_id))
        chosen: list[MergeProposal] = []
        used: set[str] = set()
        for proposal in candidates:
            if proposal.left_id not in used and proposal.right_id not in used:
                chosen.append(proposal)
                used.update((proposal.left_id, proposal.right_id))
        return chosen

    def drop_stream(self, stream_id: str) -> None:
        """Forget a closed stream's question count (its clusters' counts went with their records)."""
        self._num_questions.pop(stream_id, None)

    def num_retrievals(self, cluster_id: str) -> int:
        """Questions that retrieved ``cluster_id`` (0 once its record has ended)."""
        if cluster_id not in self._residency:
            return 0
        return self._residency.co_retrieval(cluster_id).num_retrievals

    def num_questions(self, stream_id: str) -> int:
        """Questions observed on ``stream_id``."""
        return self._num_questions.get(stream_id, 0)

    def pair_counts(self, left_id: str, right_id: str) -> tuple[int, int]:
        """``(num_either, num_joint)`` of an adjacent pair; (0, 0) if the two are not neighbours now."""
        if not self._linked(left_id, right_id):
            return (0, 0)
        counts = self._residency.co_retrieval(left_id)
        return (counts.pair_either, counts.pair_joint)

    def _counts(self, stream_id: str, cluster_id: str) -> CoRetrieval:
        """The cluster's counts, after checking that it is tracked and is ``stream_id``'s."""
        owner = self._residency.stream_of(cluster_id)
        if owner != stream_id:
            raise InvalidArgumentError(f"cluster {cluster_id!r} belongs to stream {owner!r}, not {stream_id!r}")
        return self._residency.co_retrieval(cluster_id)

    def _linked(self, left_id: str | None, right_id: str | None) -> bool:
        """Whether both clusters are tracked and name each other as neighbours."""
        residency = self._residency
        return (
            left_id in residency
            and right_id in residency
            and residency.co_retrieval(left_id).right == right_id
            and residency.co_retrieval(right_id).left == left_id
        )
