"""Choosing and fetching the history a question attends to, one layer at a time, in each of the three modes.

- ``full``: every cluster, already on the device; no choice, no copy.
- ``token``: frame-sized blocks scored by their mean key (ReKV-style), each chosen block's layer copied on its
  own, nothing cached on the device between questions.
- ``cluster``: clusters scored by centroid and spread; chosen clusters are brought to the device whole (one copy
  each, all layers, so later layers and later questions find them there) and pinned for the question. A cluster
  that cannot be made resident falls back to a copy of the one layer needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

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
    probabilities: dict[str, float] = field(default_factory=dict)  # softmax of scores over candidates


class Retriever:
    """Selects clusters per layer for one question and keeps track of what it pinned."""

    def __init__(
        self,
        *,
        mode: RetrievalMode,
        spec: KVSpec,
        tiering: TierManager,
        stream: StreamState,
        candidates: list[str],
        budget_tokens: int,
    ) -> None:
        self.mode = mode
        self.spec = spec
        self.tiering = tiering
        self.stream = stream
        self.candidates = candidates
        self.budget_tokens = budget_tokens
        self.pinned: set[str] = set()
        self.score_s = 0.0  # stage timers for the benchmark's breakdown (synchronised on CUDA)
        self.fetch_s = 0.0
        self._sizes = {cid: stream.summaries.count(cid) for cid in candidates}

    def select(self, layer: int, query: torch.Tensor) -> LayerSelection:
        """Scores the candidates with ``query`` ``[num_q_heads, T, D]`` and gathers the chosen layer KV."""
        if not self.candidates:
            return LayerSelection([], None, 0, 0, 0)
        start = _now(query.device)
        mean, var, log_count = self.stream.summaries.layer_summaries(layer, self.candidates)
        scores = score_clusters(
            query,
            mean,
            var,
            log_count,
            scale=self.spec.scale,
            use_spread=self.mode is not RetrievalMode.TOKEN,
        )
        probabilities = dict(zip(self.candidates, torch.softmax(scores, 0).tolist(), strict=True))
        if self.mode is RetrievalMode.FULL:
            chosen = list(self.candidates)
        else:
            order = torch.argsort(scores, descending=True).tolist()
            chosen = self._fill_budget([self.candidates[i] for i in order])
        scored = _now(query.device)
        pieces, bytes_copied, num_copies = self._gather(layer, chosen)
        kv = concat_past(pieces) if pieces else None
        self.score_s += scored - start
        self.fetch_s += _now(query.device) - scored
        num_tokens = 0 if kv is None else kv.shape[2]
        return LayerSelection(chosen, kv, num_tokens, bytes_copied, num_copies, probabilities)

    def release(self) -> None:
        """Unpins what this question pinned."""
        for cluster_id in self.pinned:
            self.tiering.residency.unpin(cluster_id)
        self.pinned.clear()

    def _fill_budget(self, ranked: list[str]) -> list[str]:
        chosen, used = [], 0
        for cluster_id in ranked:
            size = self._sizes[cluster_id]
            if used + size <= self.budget_tokens:
                chosen.append(cluster_id)
                used += size
        return chosen

    def _gather(self, layer: int, chosen: list[str]) -> tuple[list[torch.Tensor], int, int]:
        if self.mode is RetrievalMode.CLUSTER:
            self._make_resident(chosen)
        pieces, bytes_copied, num_copies = [], 0, 0
        for cluster_id in chosen:
            kv, copied = self.tiering.tiers.layer_on_device(cluster_id, layer)
            pieces.append(kv)
            bytes_copied += copied
            num_copies += copied > 0
        return pieces, bytes_copied, num_copies

    def _make_resident(self, chosen: list[str]) -> None:
        wanted = [cid for cid in chosen if cid not in self.pinned]
        if not wanted:
            return
        resident = self.tiering.try_fetch_to_device(wanted, keep=frozenset(self.pinned))
        for cluster_id in resident:
            self.tiering.residency.pin(cluster_id)
            self.tiering.residency.touch(cluster_id, retrieved=True)
            self.pinned.add(cluster_id)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
