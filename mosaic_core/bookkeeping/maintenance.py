"""The semantic-relevance half of clustering: what questions retrieve together.

Visual coherence (``formation``) cuts a stream where the picture changes, but questions may keep needing two
neighbouring clusters at once (a person walks through two camera views of one scene). Fetching them as one
cluster halves the transfer calls and the summaries to score, so the tracker proposes merging them.

Memory stays bounded: pair statistics are kept only for temporally adjacent clusters of one stream, which
the caller declares with ``set_neighbours``:

    c0 - c1 - c2 - c3        pairs tracked: (c0,c1) (c1,c2) (c2,c3)

For each pair the tracker counts the questions, since the pair became adjacent, that retrieved either
cluster and those that retrieved both; ``joint_fraction = num_joint / num_either``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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


@dataclass(slots=True)
class _PairStats:
    num_either: int = 0
    num_joint: int = 0


class CoRetrievalTracker:
    """Counts retrievals per cluster and co-retrievals per adjacent pair, across the streams of one engine."""

    def __init__(self) -> None:
        self._right: dict[str, str] = {}  # cluster -> next cluster of its stream
        self._left: dict[str, str] = {}  # cluster -> previous cluster of its stream
        self._pairs: dict[tuple[str, str], _PairStats] = {}
        self._stream_of: dict[str, str] = {}
        self._members: dict[str, set[str]] = {}  # stream -> clusters the tracker holds state for
        self._num_retrievals: dict[str, int] = {}
        self._num_questions: dict[str, int] = {}

    def set_neighbours(self, stream_id: str, ordered_cluster_ids: Sequence[str]) -> None:
        """Declare a stream's clusters in temporal order; replaces its previous order.

        Statistics of pairs that stay adjacent are kept; those of pairs that no longer are are dropped.
        Call it when clusters are sealed, merged, split or dropped.
        """
        if len(set(ordered_cluster_ids)) != len(ordered_cluster_ids):
            raise InvalidArgumentError(f"stream {stream_id!r}: duplicate cluster ids in {list(ordered_cluster_ids)}")
        for cluster_id in ordered_cluster_ids:
            self._check_owner(stream_id, cluster_id)
        # Only adjacent pairs ever get statistics, so the stream's old pairs are exactly its old links.
        old_pairs = {(cid, self._right[cid]) for cid in self._members.get(stream_id, ()) if cid in self._right}
        new_pairs = set(itertools.pairwise(ordered_cluster_ids))
        for left, right in old_pairs:
            del self._right[left], self._left[right]
            if (left, right) not in new_pairs:
                self._pairs.pop((left, right), None)
        for left, right in new_pairs:
            self._right[left], self._left[right] = right, left
        for cluster_id in ordered_cluster_ids:
            self._own(stream_id, cluster_id)

    def observe(self, stream_id: str, retrieved_cluster_ids: Sequence[str]) -> None:
        """Record one question's retrieved set (aggregated over layers) on ``stream_id``."""
        retrieved = set(retrieved_cluster_ids)
        for cluster_id in retrieved:
            self._check_owner(stream_id, cluster_id)
        self._num_questions[stream_id] = self._num_questions.get(stream_id, 0) + 1
        touched: set[tuple[str, str]] = set()
        for cluster_id in retrieved:
            self._own(stream_id, cluster_id)
            self._num_retrievals[cluster_id] = self._num_retrievals.get(cluster_id, 0) + 1
            if (right := self._right.get(cluster_id)) is not None:
                touched.add((cluster_id, right))
            if (left := self._left.get(cluster_id)) is not None:
                touched.add((left, cluster_id))
        for left, right in touched:
            stats = self._pairs.setdefault((left, right), _PairStats())
            stats.num_either += 1
            stats.num_joint += left in retrieved and right in retrieved

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
        for (left, right), stats in self._pairs.items():
            pair_stream = self._stream_of[left]
            if stream_id is not None and pair_stream != stream_id:
                continue
            if stats.num_either < min_questions or left not in cluster_tokens or right not in cluster_tokens:
                continue
            fraction = stats.num_joint / stats.num_either
            num_tokens = cluster_tokens[left] + cluster_tokens[right]
            if fraction >= min_joint_fraction and num_tokens <= max_tokens:
                candidates.append(MergeProposal(pair_stream, left, right, fraction, stats.num_either, num_tokens))
        candidates.sort(key=lambda p: (-p.joint_fraction, -p.num_questions, p.stream_id, p.left_id))
        chosen: list[MergeProposal] = []
        used: set[str] = set()
        for proposal in candidates:
            if proposal.left_id not in used and proposal.right_id not in used:
                chosen.append(proposal)
                used.update((proposal.left_id, proposal.right_id))
        return chosen

    def forget(self, cluster_id: str) -> None:
        """Drop all state about a cluster (merged away, split or dropped); unknown ids are ignored."""
        stream_id = self._stream_of.pop(cluster_id, None)
        if stream_id is None:
            return
        self._members.get(stream_id, set()).discard(cluster_id)
        self._num_retrievals.pop(cluster_id, None)
        if (right := self._right.pop(cluster_id, None)) is not None:
            del self._left[right]
            self._pairs.pop((cluster_id, right), None)
        if (left := self._left.pop(cluster_id, None)) is not None:
            del self._right[left]
            self._pairs.pop((left, cluster_id), None)

    def drop_stream(self, stream_id: str) -> None:
        """Drop all state about a stream."""
        for cluster_id in list(self._members.get(stream_id, ())):
            self.forget(cluster_id)
        self._members.pop(stream_id, None)
        self._num_questions.pop(stream_id, None)

    def num_retrievals(self, cluster_id: str) -> int:
        """Questions that retrieved ``cluster_id``."""
        return self._num_retrievals.get(cluster_id, 0)

    def num_questions(self, stream_id: str) -> int:
        """Questions observed on ``stream_id``."""
        return self._num_questions.get(stream_id, 0)

    def pair_counts(self, left_id: str, right_id: str) -> tuple[int, int]:
        """``(num_either, num_joint)`` of an adjacent pair; (0, 0) if not tracked."""
        stats = self._pairs.get((left_id, right_id))
        return (0, 0) if stats is None else (stats.num_either, stats.num_joint)

    def _check_owner(self, stream_id: str, cluster_id: str) -> None:
        owner = self._stream_of.get(cluster_id, stream_id)
        if owner != stream_id:
            raise InvalidArgumentError(f"cluster {cluster_id!r} belongs to stream {owner!r}, not {stream_id!r}")

    def _own(self, stream_id: str, cluster_id: str) -> None:
        self._check_owner(stream_id, cluster_id)
        self._stream_of[cluster_id] = stream_id
        self._members.setdefault(stream_id, set()).add(cluster_id)
