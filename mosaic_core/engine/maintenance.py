"""Query-driven cluster maintenance: merge neighbours that questions keep retrieving together.

Visual coherence decides clusters as frames arrive; questions then reveal which neighbours belong together
semantically. Merging them means one summary to score and one copy to fetch where there were two.
"""

from __future__ import annotations

import torch

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.engine.parts import EngineParts
from mosaic_core.engine.stream import StreamState


def mergeable_clusters(parts: EngineParts, state: StreamState) -> list[str]:
    """Sealed clusters whose frames have all left the local window, in temporal order."""
    in_window = state.local_cluster_ids()
    residency = parts.tiering.residency
    return [
        r.cluster_id
        for r in state.former.records()
        if r.sealed and r.cluster_id in residency and r.cluster_id not in in_window
    ]


def apply_merges(parts: EngineParts, state: StreamState, retrieved: list[str]) -> list[str]:
    """Records one question's retrieved set and performs the merges it makes due; returns new cluster ids."""
    tracker, config = parts.tracker, parts.config
    ordered = mergeable_clusters(parts, state)
    tracker.set_neighbours(state.stream_id, ordered)
    tracker.observe(state.stream_id, [cid for cid in retrieved if cid in set(ordered)])
    residency = parts.tiering.residency
    sizes = {cid: state.summaries.count(cid) for cid in ordered if not residency.record(cid).pinned}
    proposals = tracker.proposals(
        max_tokens=config.formation.max_tokens,
        cluster_tokens=sizes,
        min_questions=config.merge_min_questions,
        min_joint_fraction=config.merge_min_joint_fraction,
        stream_id=state.stream_id,
    )
    merged_ids = [merge_clusters(parts, state, p.left_id, p.right_id) for p in proposals]
    if merged_ids:
        tracker.set_neighbours(state.stream_id, mergeable_clusters(parts, state))
    return merged_ids


def merge_clusters(parts: EngineParts, state: StreamState, left_id: str, right_id: str) -> str:
    """Replaces two adjacent sealed clusters by one, placed in the hotter of their two tiers."""
    tiering = parts.tiering
    prefer = min(tiering.residency.tier_of(left_id), tiering.residency.tier_of(right_id))
    device = parts.model.device
    kv = torch.cat([tiering.tiers.read(left_id).to(device), tiering.tiers.read(right_id).to(device)], dim=3)
    record = state.former.merge_records(state.former.get(left_id), state.former.get(right_id))
    for cluster_id in (left_id, right_id):
        tiering.remove(cluster_id)
        parts.tracker.forget(cluster_id)
    tiering.admit(record.cluster_id, state.stream_id, kv, prefer=Tier(prefer))
    state.summaries.merge(left_id, right_id, record.cluster_id)
    if parts.history is not None:
        parts.history.on_merge(state, record.cluster_id, [left_id, right_id])
    return record.cluster_id
