"""Choosing and fetching the history a question attends to, one layer at a time, in each of the three modes.

- ``full``: every cluster, already on the device; no choice, no copy.
- ``token``: frame-sized blocks scored by their mean key (ReKV-style), each chosen block's layer copied on its
  own, nothing cached on the device between questions.
- ``cluster``: clusters scored by centroid and spread. A chosen cluster already on the device (the GPU cluster
  cache) costs nothing; otherwise its layer slab moves in one contiguous copy. After the answer, the clusters
  most layers chose are promoted to the device whole, off the question's critical path, for the next question.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.config import RetrievalMode
from mosaic_core.engine.attend import concat_past
from mosaic_core.engine.stream import StreamState
from mosaic_core.engine.summaries import score_clusters
from mosaic_core.engine.tiering import TierManager
from mosaic_core.memory.layout import KVSpec


@dataclass(slots=True)
class LayerSelection:
    """What one layer retrieved."""

    cluster_ids: list[str]
    kv: torch.Tensor | None  # [2, num_kv_heads, num_tokens, head_dim] on device
    num_tokens: int
    bytes_copied: int
    num_copies: int
    scores: torch.Tensor | None = None  # [num_candidates], kept on the device until the answer ends

    def probabilities(self, candidates: list[str]) -> dict[str, float]:
        """Softmax of the scores over the candidates: each chosen cluster's predicted share of attention."""
        if self.scores is None:
            return {}
        return dict(zip(candidates, torch.softmax(self.scores, 0).tolist(), strict=True))


class Retriever:
    """Selects clusters per layer for one question and counts how many layers chose each."""

    def __init__(
        self,
        *,
        mode: RetrievalMode,
        spec: KVSpec,
        tiering: TierManager,
        stream: StreamState,
        candidates: list[str],
        budget_tokens: int,
        profile: bool = False,
    ) -> None:
        self.mode = mode
        self.spec = spec
        self.tiering = tiering
        self.stream = stream
        self.candidates = candidates
        self.budget_tokens = budget_tokens
        self.votes: dict[str, int] = {}  # cluster -> layers that chose it
        # Stage timers for the benchmark's breakdown. They synchronise the device, so they are off by default.
        self.profile = profile
        self.score_s = 0.0
        self.fetch_s = 0.0
        self._sizes = {cid: stream.summaries.count(cid) for cid in candidates}
        self._rows = stream.summaries.rows(candidates) if candidates else None

    def select(self, layer: int, query: torch.Tensor) -> LayerSelection:
        """Scores the candidates with ``query`` ``[num_q_heads, T, D]`` and gathers the chosen layer KV."""
        if not self.candidates:
            return LayerSelection([], None, 0, 0, 0)
        start = self._now(query.device)
        mean, var, log_count = self.stream.summaries.layer_summaries(layer, self._rows)
        scores = score_clusters(
            query,
            mean,
            var,
            log_count,
            scale=self.spec.scale,
            use_spread=self.mode is not RetrievalMode.TOKEN,
        )
        if self.mode is RetrievalMode.FULL:
            chosen = list(self.candidates)
        else:
            order = torch.argsort(scores, descending=True).tolist()
            chosen = self._fill_budget([self.candidates[i] for i in order])
        scored = self._now(query.device)
        pieces, bytes_copied, num_copies = self._gather(layer, chosen)
        kv = concat_past(pieces) if pieces else None
        self.score_s += scored - start
        self.fetch_s += self._now(query.device) - scored
        num_tokens = 0 if kv is None else kv.shape[2]
        return LayerSelection(chosen, kv, num_tokens, bytes_copied, num_copies, scores)

    def promote(self) -> list[str]:
        """After the answer: caches on the device the clusters that at least half of the layers chose."""
        if self.mode is not RetrievalMode.CLUSTER or not self.votes:
            return []
        num_layers = self.spec.num_layers
        wanted = [cid for cid, n in sorted(self.votes.items(), key=lambda kv: -kv[1]) if 2 * n >= num_layers]
        for cluster_id in self.votes:
            self.tiering.residency.touch(cluster_id, retrieved=True)
        return self.tiering.promote(wanted, keep=frozenset(self.votes))

    def _fill_budget(self, ranked: list[str]) -> list[str]:
        chosen, used = [], 0
        for cluster_id in ranked:
            size = self._sizes[cluster_id]
            if used + size <= self.budget_tokens:
                chosen.append(cluster_id)
                used += size
        return chosen

    def _gather(self, layer: int, chosen: list[str]) -> tuple[list[torch.Tensor], int, int]:
        pieces, bytes_copied, num_copies = [], 0, 0
        for cluster_id in chosen:
            if self.mode is RetrievalMode.CLUSTER and cluster_id not in self.votes:
                self.tiering.record_lookup(hit=self.tiering.residency.tier_of(cluster_id) is Tier.DEVICE)
            self.votes[cluster_id] = self.votes.get(cluster_id, 0) + 1
            kv, copied = self.tiering.tiers.layer_on_device(cluster_id, layer)
            pieces.append(kv)
            bytes_copied += copied
            num_copies += copied > 0
        return pieces, bytes_copied, num_copies

    def _now(self, device: torch.device) -> float:
        if not self.profile:
            return 0.0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
