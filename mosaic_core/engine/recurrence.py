"""Vision centroids of a stream's clusters, kept for recurring-scene joins (``maintenance.join_recurring``).

Formation compares a frame only with the open cluster, so a scene the camera comes back to (a pan back, a looped
clip, a gate that opens every hour) starts a new cluster each visit. To join a completed cluster with an earlier
visit, each cluster's mean frame summary (the vision embedding formation already compares) is kept here:

    frames of c3 -> sum, count -> centroid(c3) . centroid(c0), centroid(c1), ...  (cosines, one device sync)

Only a stream with joins on keeps centroids (``note_frame``). A restarted stream's restored clusters have none
(their records do not carry them), so they are never join candidates.
"""

from __future__ import annotations

import weakref

import torch

from mosaic_core.engine.stream import StreamState


class VisionCentroids:
    """Running sums of each cluster's frame summaries ``[hidden]``, on the device the summaries come from."""

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}

    def __contains__(self, cluster_id: str) -> bool:
        return cluster_id in self._sum

    def __len__(self) -> int:
        return len(self._sum)

    def add(self, cluster_id: str, summary: torch.Tensor) -> None:
        summary = summary.detach().float()
        if cluster_id in self._sum:
            self._sum[cluster_id] += summary
            self._count[cluster_id] += 1
        else:
            self._sum[cluster_id] = summary.clone()
            self._count[cluster_id] = 1

    def similarities(self, cluster_id: str, others: list[str]) -> list[float]:
        """Cosine of ``cluster_id``'s centroid to each of ``others`` (all must be known), read back at once."""
        mine = self._sum[cluster_id]
        stacked = torch.stack([self._sum[other] for other in others])  # [n, hidden]; a cosine ignores the count
        return torch.nn.functional.cosine_similarity(stacked, mine[None], dim=1).tolist()

    def combine(self, ids: list[str], new_id: str) -> None:
        """``new_id`` is made of the clusters ``ids``; it has a centroid only if all of them had one."""
        known = all(cid in self._sum for cid in ids)
        sums = [self._sum.pop(cid, None) for cid in ids]
        counts = [self._count.pop(cid, 0) for cid in ids]
        if known:
            self._sum[new_id] = torch.stack(sums).sum(dim=0)
            self._count[new_id] = sum(counts)

    def keep_only(self, cluster_ids: set[str]) -> None:
        """Forgets clusters no longer held (dropped by retention, or split)."""
        for cluster_id in [cid for cid in self._sum if cid not in cluster_ids]:
            del self._sum[cluster_id], self._count[cluster_id]


# StreamState belongs to the engine's stream module; the centroids live beside it, for as long as it does.
_CENTROIDS: weakref.WeakKeyDictionary[StreamState, VisionCentroids] = weakref.WeakKeyDictionary()


def centroids_of(state: StreamState) -> VisionCentroids:
    centroids = _CENTROIDS.get(state)
    if centroids is None:
        centroids = _CENTROIDS[state] = VisionCentroids()
    return centroids
