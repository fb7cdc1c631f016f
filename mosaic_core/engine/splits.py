"""Splits: a cluster whose frames questions attend to unevenly is cut in two, so that a question fetches the part it
wants without the rest.

After each question, for every retrieved cluster that may be split (sealed, out of the local window, unpinned, one
span, on the device or host), the question's query at the layer that chose the clusters attends over the cluster's
own keys at that layer, and that attention is divided among its frames:

    q (choosing layer, every head and question token) . k (the cluster)  ->  softmax over the cluster's tokens
    ->  mean over heads and question tokens  ->  mass per frame   (summed over the questions that retrieved it)

Once ``formation.split_min_questions`` questions retrieved a cluster, the cut between two frames that maximises the
ratio of the two parts' attention densities (mass per token) is taken if that ratio reaches
``formation.split_min_density_ratio``. The halves keep the cluster's tier and get fresh ids; their summaries are
recomputed from their keys, keyframes and durable history follow (one journal line), and their statistics start
afresh. The halves take the cluster's pages as they are (each frame starts pages of its own), so no KV moves, but
the statistics read each retrieved cluster's KV once per question (a copy within its tier, computed there), so
splitting is off by default (``split_min_questions=None``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from mosaic_core.bookkeeping.cluster_record import ClusterRecord
from mosaic_core.bookkeeping.pages import pages_for
from mosaic_core.engine.keyframe_store import store_for
from mosaic_core.engine.maintenance import made_beside_copies, next_ids, reserve_numbers
from mosaic_core.engine.parts import EngineParts
from mosaic_core.engine.recurrence import centroids_of
from mosaic_core.engine.stream import StreamState
from mosaic_core.errors import CapacityError


@dataclass(slots=True)
class FrameShares:
    """Per-frame shares of a cluster's attention mass, summed over the questions that retrieved it."""

    num_questions: int
    shares: np.ndarray


class SplitStats:
    """One stream's per-frame attention shares of the clusters questions retrieved."""

    def __init__(self) -> None:
        self._by_cluster: dict[str, FrameShares] = {}

    def add(self, cluster_id: str, shares: np.ndarray) -> None:
        held = self._by_cluster.get(cluster_id)
        if held is None or held.shares.shape != shares.shape:
            self._by_cluster[cluster_id] = FrameShares(1, shares.copy())
        else:
            held.num_questions += 1
            held.shares += shares

    def get(self, cluster_id: str) -> FrameShares | None:
        return self._by_cluster.get(cluster_id)

    def keep_only(self, cluster_ids: set[str]) -> None:
        """Forgets clusters no longer held (merged, joined, split or dropped by retention)."""
        for cluster_id in [cid for cid in self._by_cluster if cid not in cluster_ids]:
            del self._by_cluster[cluster_id]


_STATS: weakref.WeakKeyDictionary[StreamState, SplitStats] = weakref.WeakKeyDictionary()


def stats_of(state: StreamState) -> SplitStats:
    stats = _STATS.get(state)
    if stats is None:
        stats = _STATS[state] = SplitStats()
    return stats


def splits_on(parts: EngineParts) -> bool:
    return parts.config.formation.split_min_questions is not None


def best_cut(shares: np.ndarray, num_tokens: list[int]) -> tuple[int, float]:
    """The cut (index of the first frame of the second part) with the highest density ratio, and that ratio."""
    mass, tokens = np.cumsum(shares), np.cumsum(num_tokens)
    best, best_ratio = 0, 1.0
    for cut in range(1, len(shares)):
        left = mass[cut - 1] / tokens[cut - 1]
        right = (mass[-1] - mass[cut - 1]) / (tokens[-1] - tokens[cut - 1])
        ratio = max(left, right) / max(min(left, right), 1e-12)
        if ratio > best_ratio:
            best, best_ratio = cut, ratio
    return best, best_ratio


def observe_and_split(parts: EngineParts, state: StreamState, choice_query, retrieved: list[str]) -> list[str]:
    """Adds one question's per-frame attention shares of ``retrieved`` and splits the clusters that became due.
    ``choice_query`` is ``(layer, query [query_heads, T, head_dim], scale)`` of the choosing layer at the prefill,
    or None. Returns the ids of the new halves."""
    stats = stats_of(state)
    records = {r.cluster_id: r for r in state.former.records()}
    stats.keep_only(set(records))
    candidates = [cid for cid in retrieved if _splittable(parts, state, records, cid)]
    if choice_query is None or not candidates:
        return []
    for cluster_id, shares in zip(candidates, _frame_shares(parts, records, candidates, choice_query), strict=True):
        if shares is not None:
            stats.add(cluster_id, shares)
    formation = parts.config.formation
    new_ids = []
    for cluster_id in candidates:
        held = stats.get(cluster_id)
        if held is None or held.num_questions < formation.split_min_questions:
            continue
        record = records[cluster_id]
        cut, ratio = best_cut(held.shares, record.frame_num_tokens)
        if cut and ratio >= formation.split_min_density_ratio and _room_to_split(parts, record, cut):
            new_ids += split_cluster(parts, state, record, record.frame_indices[cut])
    return new_ids


def split_cluster(parts: EngineParts, state: StreamState, record: ClusterRecord, at_frame_index: int) -> list[str]:
    """Replaces ``record``'s cluster by its frames before ``at_frame_index`` and from it on, in the same tier. When
    each frame has pages of its own (as ingest lays them out) the halves take those pages without a copy; a cluster
    whose pages were repacked (read back from a spill file) is copied into the halves instead.

    Raises:
        CapacityError: the halves must be copied and no tier has room for them (``room_to_copy``); nothing changed.
    """
    tiering, cluster_id = parts.tiering, record.cluster_id
    regroups = _pages_by_frame(parts, record)
    if (
        not regroups
        and at_frame_index in record.frame_indices[1:]
        and not _room_for_halves(parts, record, record.frame_indices.index(at_frame_index))
    ):
        raise CapacityError(
            f"cannot split {cluster_id!r}: no tier has room for its halves' copies, and every cluster that could "
            "make room is pinned"
        )
    reserve_numbers(parts, state, 2)  # the halves' numbers, before anything changes
    kv = tiering.tiers.read(cluster_id)  # for the halves' summaries
    page_tokens = tiering.tiers.page_tokens
    if regroups:
        halves = state.former.split_record(record, at_frame_index)
        frame_pages = [[pages_for(n, page_tokens) for n in half.frame_num_tokens] for half in halves]
        new = [(h.cluster_id, sum(len(f) for f in pages)) for h, pages in zip(halves, frame_pages, strict=True)]
        tiering.regroup(state.stream_id, [cluster_id], new)
    else:
        halves = _copy_into_halves(parts, state, record, at_frame_index, kv)
    summaries = tiering.summaries
    start = 0
    for half in halves:
        summaries.add(half.cluster_id, kv[:, 0, :, start : start + half.num_tokens].to(summaries.device))
        start += half.num_tokens
    centroids_of(state).keep_only({r.cluster_id for r in state.former.records()})
    store_for(parts, state).carry_over([cluster_id], list(halves))
    if parts.history is not None:
        parts.history.on_split(state, [h.cluster_id for h in halves], cluster_id)
    return [h.cluster_id for h in halves]


def _copy_into_halves(
    parts: EngineParts, state: StreamState, record: ClusterRecord, at_frame_index: int, kv: torch.Tensor
) -> tuple[ClusterRecord, ...]:
    """Stores the halves' copies under the ids the split will give them, then splits the record and removes the
    cluster: a store that fails (a disk that refuses the write) removes the halves stored so far and raises with
    the record and the cluster as they were. Returns the halves' records."""
    tiering, cluster_id = parts.tiering, record.cluster_id
    if at_frame_index not in record.frame_indices[1:]:
        return state.former.split_record(record, at_frame_index)  # raises, naming the frames it may cut before
    tier, keep = tiering.residency.tier_of(cluster_id), frozenset({cluster_id})
    num_tokens = _halves_num_tokens(record, record.frame_indices.index(at_frame_index))
    half_ids, stored, start = next_ids(state, 2), [], 0
    try:
        for half_id, n in zip(half_ids, num_tokens, strict=True):
            tiering.admit(half_id, state.stream_id, kv[:, :, :, start : start + n].contiguous(), prefer=tier, keep=keep)
            stored.append(half_id)
            start += n
    except BaseException:
        for half_id in stored:
            tiering.remove(half_id)
        raise
    halves = made_beside_copies(parts, half_ids, lambda: state.former.split_record(record, at_frame_index))
    tiering.remove(cluster_id)
    return halves


def _pages_by_frame(parts: EngineParts, record: ClusterRecord) -> bool:
    """Whether each of the cluster's frames has pages of its own, as ingest lays them out (then halves regroup)."""
    page_tokens = parts.tiering.tiers.page_tokens
    by_frame = [f for n in record.frame_num_tokens for f in pages_for(n, page_tokens)]
    return parts.tiering.tiers.pages(record.cluster_id).fills == by_frame


def _room_to_split(parts: EngineParts, record: ClusterRecord, cut: int) -> bool:
    """Whether the cluster can be split before its ``cut``-th frame: its pages regrouped, or its halves copied where
    ``admit`` will find room."""
    return _pages_by_frame(parts, record) or _room_for_halves(parts, record, cut)


def _room_for_halves(parts: EngineParts, record: ClusterRecord, cut: int) -> bool:
    return parts.tiering.room_to_copy([record.cluster_id], _halves_num_tokens(record, cut))


def _halves_num_tokens(record: ClusterRecord, cut: int) -> list[int]:
    """The tokens of the cluster's frames before its ``cut``-th frame and from it on."""
    return [sum(record.frame_num_tokens[:cut]), sum(record.frame_num_tokens[cut:])]


def _splittable(parts: EngineParts, state: StreamState, records: dict[str, ClusterRecord], cluster_id: str) -> bool:
    record = records.get(cluster_id)
    residency = parts.tiering.residency
    return (
        record is not None
        and record.sealed
        and record.num_frames > 1
        and len(record.spans()) == 1
        and len(record.frame_num_tokens) == record.num_frames
        and cluster_id in residency
        and parts.tiering.can_regroup([cluster_id])
        and cluster_id not in state.local_cluster_ids()
    )


def _frame_shares(parts: EngineParts, records, cluster_ids: list[str], choice_query) -> list[np.ndarray | None]:
    """How the question's attention over each cluster alone divides among its frames, computed where the cluster's
    KV lies (the query, a few KiB, goes there; no KV moves between tiers)."""
    layer, query, scale = choice_query
    out = []
    for cluster_id in cluster_ids:
        keys = parts.tiering.tiers.read(cluster_id)[layer, 0].float()  # [kv_heads, n, head_dim]
        grouped = query.to(keys.device, torch.float32).reshape(keys.shape[0], -1, keys.shape[2])
        logits = torch.einsum("hqd,hnd->hqn", grouped, keys) * scale  # query heads grouped by their KV head
        mass = torch.softmax(logits, dim=-1).mean(dim=(0, 1))
        frame_tokens = records[cluster_id].frame_num_tokens
        if sum(frame_tokens) != mass.shape[0]:
            out.append(None)
            continue
        out.append(torch.stack([part.sum() for part in mass.split(frame_tokens)]).cpu().numpy())
    return out
