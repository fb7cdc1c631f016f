"""Cluster maintenance after formation: merge neighbours that questions keep retrieving together, and join a
completed cluster with an earlier visit to the same scene.

Visual coherence decides clusters as frames arrive, one open cluster at a time; questions then reveal which
neighbours belong together semantically, and a scene the camera returns to shows itself when a completed cluster
looks like an earlier one. Merging or joining means one summary to score and one unit to fetch where there were
two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import torch

from mosaic_core.bookkeeping.cluster_record import ClusterRecord
from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.config import RetrievalMode
from mosaic_core.engine.keyframe_store import store_for
from mosaic_core.engine.parts import EngineParts
from mosaic_core.engine.recurrence import centroids_of
from mosaic_core.engine.stream import StreamState
from mosaic_core.errors import CapacityError, InvalidArgumentError

_Made = TypeVar("_Made", ClusterRecord, tuple[ClusterRecord, ...])


def mergeable_clusters(parts: EngineParts, state: StreamState) -> list[str]:
    """Sealed clusters whose frames have all left the local window, in order of their first frames."""
    in_window = state.local_cluster_ids()
    residency = parts.tiering.residency
    return [
        r.cluster_id
        for r in state.former.records_to_read()
        if r.sealed and r.cluster_id in residency and r.cluster_id not in in_window
    ]


def apply_merges(parts: EngineParts, state: StreamState, retrieved: list[str]) -> list[str]:
    """Records one question's retrieved set and performs the merges it makes due; returns new cluster ids."""
    tracker, config = parts.tracker, parts.config
    ordered = mergeable_clusters(parts, state)
    tracker.set_neighbours(state.stream_id, ordered)
    mergeable = set(ordered)
    tracker.observe(state.stream_id, [cid for cid in retrieved if cid in mergeable])
    proposals = tracker.proposals(
        max_tokens=config.formation.max_tokens,
        cluster_tokens=_MergeableSizes(parts, state, mergeable),
        min_questions=config.merge_min_questions,
        min_joint_fraction=config.merge_min_joint_fraction,
        stream_id=state.stream_id,
    )
    read = state.former.record_to_read
    merged_ids = []
    for p in proposals:  # room judged as each merge comes, after the merges before it took theirs
        if same_frame_size(read(p.left_id), read(p.right_id)) and room_to_replace(parts, [p.left_id, p.right_id]):
            merged_ids.append(merge_clusters(parts, state, p.left_id, p.right_id))
    if merged_ids:
        tracker.set_neighbours(state.stream_id, mergeable_clusters(parts, state))
    return merged_ids


class _MergeableSizes(Mapping[str, int]):
    """The tokens of each cluster that may take part in a merge, looked up only for the pairs the tracker judges
    (a few), not listed for all of a stream's clusters at every question. A pinned cluster takes no part, nor does a
    joined one: it spans the clusters between its visits, and merging it with a neighbour would interleave their
    frames."""

    def __init__(self, parts: EngineParts, state: StreamState, mergeable: set[str]) -> None:
        self._parts, self._state, self._mergeable = parts, state, mergeable

    def __contains__(self, cluster_id: object) -> bool:
        if cluster_id not in self._mergeable:
            return False
        residency = self._parts.tiering.residency
        record = self._state.former.record_to_read(cluster_id)
        return not residency.record_to_read(cluster_id).pinned and len(record.spans()) == 1

    def __getitem__(self, cluster_id: str) -> int:
        if cluster_id not in self:
            raise KeyError(cluster_id)
        return self._parts.tiering.summaries.count(cluster_id)

    def __iter__(self) -> Iterator[str]:
        return (cid for cid in self._mergeable if cid in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def same_frame_size(a: ClusterRecord, b: ClusterRecord) -> bool:
    """Whether two clusters' frames all have one size, as one cluster's record must (its pages are of that size). A
    stream's frame size is chosen at its first frame in each process, so clusters restored from before a restart
    may differ from the new ones (another ``target_tokens_per_frame``, or a camera whose resolution changed)."""
    return len({*a.frame_num_tokens, *b.frame_num_tokens}) == 1


def room_to_replace(parts: EngineParts, old_ids: list[str]) -> bool:
    """Whether one cluster can take the place of ``old_ids``: their pages regrouped, or their KV copied into one
    where ``admit`` will find room (``TierManager.room_to_copy``)."""
    tiering = parts.tiering
    if tiering.can_regroup(old_ids):
        return True
    return tiering.room_to_copy(old_ids, [sum(tiering.summaries.count(cid) for cid in old_ids)])


def merge_clusters(parts: EngineParts, state: StreamState, left_id: str, right_id: str) -> str:
    """Replaces two adjacent sealed clusters by one, placed in the hotter of their two tiers.

    Raises:
        InvalidArgumentError: their frames are of different sizes (``same_frame_size``).
        CapacityError: no tier has room for the merged copy (``room_to_replace``); nothing changed.
    """
    left, right = state.former.get(left_id), state.former.get(right_id)
    if not same_frame_size(left, right):
        raise InvalidArgumentError(
            f"cannot merge {left_id!r} and {right_id!r}: their frames have different sizes "
            f"({sorted(set(left.frame_num_tokens))} and {sorted(set(right.frame_num_tokens))} tokens)"
        )
    if not room_to_replace(parts, [left_id, right_id]):
        raise CapacityError(
            f"cannot merge {left_id!r} and {right_id!r}: no tier has room for their KV copied into one, and every "
            "cluster that could make room is pinned"
        )
    reserve_numbers(parts, state, 1)
    return _replace(parts, state, [left_id, right_id], lambda: state.former.merge_records(left, right)).cluster_id


def note_frame(parts: EngineParts, state: StreamState, cluster_id: str, summary: torch.Tensor) -> None:
    """A frame joined ``cluster_id``: keep its vision summary for recurring-scene joins (only when they are on)."""
    if _joins_on(parts):
        centroids_of(state).add(cluster_id, summary)


def join_recurring(parts: EngineParts, state: StreamState, cluster_id: str) -> str | None:
    """``cluster_id`` has just completed (sealed, its last frame stored): joins it with the most similar earlier
    cluster of the stream that is held, complete, unpinned and small enough, when their vision centroids' cosine
    reaches ``formation.join_min_similarity``. Returns the joined cluster's id."""
    if not _joins_on(parts):
        return None
    record = state.former.get(cluster_id)
    formation, residency, centroids = parts.config.formation, parts.tiering.residency, centroids_of(state)
    records = state.former.records_to_read()
    centroids.keep_only({r.cluster_id for r in records})
    if cluster_id not in centroids or residency.record(cluster_id).pinned:
        return None
    in_window = state.local_cluster_ids()
    candidates = [
        r
        for r in records
        if r.sealed
        and r.cluster_id != cluster_id
        and r.cluster_id in centroids
        and r.cluster_id in residency
        and r.cluster_id not in in_window
        and not residency.record(r.cluster_id).pinned
        and r.num_tokens + record.num_tokens <= formation.max_tokens
        and max(r.frame_indices) < record.frame_indices[0]
        and same_frame_size(r, record)
    ][-formation.join_max_candidates :]
    if not candidates:
        return None
    similarities = centroids.similarities(cluster_id, [r.cluster_id for r in candidates])
    best = max(range(len(candidates)), key=similarities.__getitem__)
    if similarities[best] < formation.join_min_similarity:
        return None
    earlier = candidates[best]
    if not room_to_replace(parts, [earlier.cluster_id, cluster_id]):
        return None
    reserve_numbers(parts, state, 1)
    joined = _replace(
        parts, state, [earlier.cluster_id, cluster_id], lambda: state.former.join_records(earlier, record)
    )
    return joined.cluster_id


def reserve_numbers(parts: EngineParts, state: StreamState, clusters: int) -> None:
    """Reserves the cluster numbers a merge, a join or a split is about to take, in the stream's journal, before
    anything changes: a journal write that fails then fails it whole (``HistoryKeeper.ensure_ids``)."""
    if parts.history is not None:
        parts.history.ensure_ids(state, clusters=clusters)


def next_ids(state: StreamState, clusters: int) -> list[str]:
    """The ids the stream's former gives the next ``clusters`` new clusters (a merge's, a join's, a split's)."""
    former = state.former
    return former.ids_numbered(range(former.next_number, former.next_number + clusters))


def made_beside_copies(parts: EngineParts, copy_ids: list[str], make: Callable[[], _Made]) -> _Made:
    """The former's new records from ``make``, for copies already stored under ``copy_ids`` (``next_ids``); when
    ``make`` raises, the copies are removed and the error raised, the old clusters (not yet removed) as they were."""
    try:
        made = make()
    except BaseException:
        for cluster_id in copy_ids:
            parts.tiering.remove(cluster_id)
        raise
    made_ids = [r.cluster_id for r in made] if isinstance(made, tuple) else [made.cluster_id]
    assert made_ids == copy_ids, f"copies stored as {copy_ids}, but the former made {made_ids}"
    return made


def _joins_on(parts: EngineParts) -> bool:
    return parts.config.formation.join_min_similarity is not None and parts.config.mode is RetrievalMode.CLUSTER


def _replace(
    parts: EngineParts, state: StreamState, old_ids: list[str], make_record: Callable[[], ClusterRecord]
) -> ClusterRecord:
    """Makes the record ``make_record`` gives (the former's merge or join of ``old_ids``) a cluster of their KV (in
    that order) and retires them everywhere: tiers, records (their summary rows and co-retrieval counts end with
    them), vision centroids, keyframes (carried over) and durable history (one journal line). The new record's
    summary is the sum of theirs. In one memory tier the pages change hands without a copy; otherwise both are read
    onto the device and the copy is stored in the hotter of their tiers, counted in the tier stats, before the
    record is made and they are removed: a store that fails (a disk that refuses the write) raises with every
    record and cluster as it was. Returns the record."""
    tiering = parts.tiering
    merged_summary = tiering.summaries.combined(old_ids)  # before their records, and rows, end
    if tiering.can_regroup(old_ids):
        record = make_record()
        num_pages = sum(tiering.tiers.pages(cid).num_pages for cid in old_ids)
        tiering.regroup(state.stream_id, old_ids, [(record.cluster_id, num_pages)])
    else:
        copy_ids = next_ids(state, 1)
        _copy_into_one(parts, state, old_ids, copy_ids[0])
        record = made_beside_copies(parts, copy_ids, make_record)
        for cluster_id in old_ids:
            tiering.remove(cluster_id)
    tiering.summaries.put(record.cluster_id, *merged_summary)
    centroids_of(state).combine(old_ids, record.cluster_id)
    store_for(parts, state).carry_over(old_ids, [record])
    if parts.history is not None:
        parts.history.on_merge(state, record.cluster_id, old_ids)
    return record


def _copy_into_one(parts: EngineParts, state: StreamState, old_ids: list[str], new_id: str) -> None:
    tiering, device = parts.tiering, parts.model.device
    stats, bytes_per_token = tiering.tiers.stats, parts.spec.bytes_per_token
    tiers_before = [Tier(tiering.residency.tier_of(cid)) for cid in old_ids]
    parts_kv = [tiering.tiers.read(cid).to(device) for cid in old_ids]
    for tier, kv in zip(tiers_before, parts_kv, strict=True):
        if tier is not Tier.DEVICE:
            stats.record(tier, Tier.DEVICE, kv.shape[3] * bytes_per_token)
    kv = torch.cat(parts_kv, dim=3)
    tier = tiering.admit(new_id, state.stream_id, kv, prefer=min(tiers_before), keep=frozenset(old_ids))
    if tier is not Tier.DEVICE:
        stats.record(Tier.DEVICE, tier, kv.shape[3] * bytes_per_token)
