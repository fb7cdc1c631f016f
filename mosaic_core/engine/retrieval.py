"""Choosing and fetching the history a question attends to, one layer at a time, in each of the three modes.

- ``full``: every cluster, already on the device; no choice and no host transfer.
- ``token``: frame-sized blocks scored by their mean key (ReKV-style), each chosen block's layer copied on its
  own, nothing cached on the device between questions.
- ``cluster``: clusters scored by centroid and spread. A chosen cluster already on the device (the GPU cluster
  cache) costs no transfer; the chosen layer slabs of one layer, wherever they live, move into the question's
  buffer in one gather launch (on CUDA). With ``prefetch_after_layer`` set, the layers up to it score their own
  queries and every later layer takes that layer's choice, so their gathers are queued on the transfer engine's
  side stream at once and run while the earlier layers compute. After the answer, the clusters most layers chose
  are promoted to the device whole, off the question's critical path, for the next question.

Gathers are queued, never waited for here: the plan makes the compute stream wait for a layer's gather right
before that layer attends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.config import RetrievalMode
from mosaic_core.engine.stream import StreamState
from mosaic_core.engine.summaries import score_clusters
from mosaic_core.engine.tiering import TierManager
from mosaic_core.memory.layout import KVSpec
from mosaic_core.memory.transfer import Moved


@dataclass(slots=True)
class LayerSelection:
    """What one layer retrieved."""

    cluster_ids: list[str]
    slabs: list[torch.Tensor]  # each [2, num_kv_heads, n_c, head_dim], where its cluster lives
    on_device: list[bool]  # per slab: its cluster is in the device tier (no transfer needed)
    num_tokens: int
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
        prefetch_after_layer: int | None = None,
        profile: bool = False,
    ) -> None:
        self.mode = mode
        self.spec = spec
        self.tiering = tiering
        self.stream = stream
        self.candidates = candidates
        self.budget_tokens = budget_tokens
        last = spec.num_layers - 1
        shared = mode is RetrievalMode.CLUSTER and prefetch_after_layer is not None and prefetch_after_layer < last
        self.prefetch_after_layer = prefetch_after_layer if shared else None
        self.votes: dict[str, int] = {}  # cluster -> layers that chose it
        # Stage timers for the benchmark's breakdown. They synchronise the device, so they are off by default.
        self.profile = profile
        self.score_s = 0.0
        self.fetch_s = 0.0
        self._sizes = {cid: stream.summaries.count(cid) for cid in candidates}
        # Every layer's centroids and variances at once: [C, num_layers, num_kv_heads, head_dim].
        self._summaries = stream.summaries.all_layers(candidates) if candidates else None
        self._timed_gathers: list[Moved] = []

    def select(self, layer: int, query: torch.Tensor) -> LayerSelection:
        """Scores the candidates with ``query`` ``[num_q_heads, T, D]``; the chosen slabs are not moved yet."""
        if not self.candidates:
            return LayerSelection([], [], [], 0)
        start = self._now(query.device)
        mean, var, log_count = self._summaries
        scores = score_clusters(
            query,
            mean[:, layer],
            var[:, layer],
            log_count,
            scale=self.spec.scale,
            use_spread=self.mode is not RetrievalMode.TOKEN,
        )
        if self.mode is RetrievalMode.FULL:
            chosen = list(self.candidates)
        else:
            order = torch.argsort(scores, descending=True).tolist()
            chosen = self._fill_budget([self.candidates[i] for i in order])
        slabs = [self._slab(cluster_id, layer) for cluster_id in chosen]
        on_device = [self.tiering.residency.tier_of(cluster_id) is Tier.DEVICE for cluster_id in chosen]
        self.score_s += self._now(query.device) - start
        return LayerSelection(chosen, slabs, on_device, sum(slab.shape[2] for slab in slabs), scores)

    def reuse(self, layer: int, chosen: LayerSelection) -> LayerSelection:
        """Layer ``layer``'s slabs of clusters another layer chose (no scoring of its own)."""
        slabs = [self._slab(cluster_id, layer) for cluster_id in chosen.cluster_ids]
        return LayerSelection(list(chosen.cluster_ids), slabs, list(chosen.on_device), chosen.num_tokens)

    def gather_into(self, selection: LayerSelection, buffer: torch.Tensor, first_token: int) -> tuple[int, Moved]:
        """Queues a layer's chosen slabs into ``buffer[:, :, first_token:]``; returns the end offset and the move
        to wait for before reading the buffer.

        ``cluster`` and ``full`` modes move every slab of the layer in one kernel launch that reads pinned host
        and device memory in place (on CUDA). ``token`` mode keeps the ReKV baseline: one copy per block.
        """
        start = self._now(buffer.device)
        host = [slab for slab, resident in zip(selection.slabs, selection.on_device, strict=True) if not resident]
        batched = self.mode is not RetrievalMode.TOKEN and buffer.is_cuda and all(s.is_pinned() for s in host)
        end, moved = self.tiering.tiers.transfers.gather(selection.slabs, buffer, first_token, batched=batched)
        if host:
            num_bytes = sum(slab.numel() * slab.element_size() for slab in host)
            self.tiering.tiers.stats.record(Tier.HOST, Tier.DEVICE, num_bytes, 1 if batched else len(host))
            self._timed_gathers.append(moved)
        self.fetch_s += self._now(buffer.device) - start
        return end, moved

    def transfer_seconds(self) -> float:
        """Device time spent gathering retrieved KV that had to be copied (waits for the copies to finish)."""
        return sum(moved.seconds() for moved in self._timed_gathers)

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

    def _slab(self, cluster_id: str, layer: int) -> torch.Tensor:
        # One lookup per cluster and question; token-mode blocks live on the host, so they always miss.
        if self.mode is not RetrievalMode.FULL and cluster_id not in self.votes:
            self.tiering.record_lookup(hit=self.tiering.residency.tier_of(cluster_id) is Tier.DEVICE)
        self.votes[cluster_id] = self.votes.get(cluster_id, 0) + 1
        return self.tiering.tiers.layer_slab(cluster_id, layer)

    def _now(self, device: torch.device) -> float:
        if not self.profile:
            return 0.0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
