"""Per-cluster key summaries that let a question score every cluster of a stream in one pass per layer.

For each cluster, layer and KV head we keep the running sum and sum of squares of the cluster's keys. From them:
the centroid ``mu`` and the diagonal variance ``var``. A question query ``q`` then estimates the cluster's
attention mass (log of the sum of ``exp(scale * q.k)`` over its keys) as if its keys were Gaussian:

    log_mass ~ log(n) + scale * q.mu + 0.5 * scale^2 * sum_d q_d^2 var_d

The log-count and the spread enter explicitly, so a big diffuse cluster is not mistaken for a small sharp one
(the failure of centroid-only scoring). Token mode scores with the centroid alone, as ReKV and InfLLM do.
"""

from __future__ import annotations

import torch

from mosaic_core.kernels import kernels_ready
from mosaic_core.memory.layout import KVSpec


class SummaryIndex:
    """Rows of key statistics, one row per cluster of one stream, kept on the engine's device."""

    def __init__(self, spec: KVSpec, *, device: torch.device) -> None:
        self.spec = spec
        self.device = device
        self._rows: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._free_rows: list[int] = []  # rows of removed clusters, reused first: a long stream never grows
        self._num_tokens: dict[str, int] = {}  # host-side copy of the counts, so sizes never sync the device
        capacity = 16
        # [capacity, num_layers, num_kv_heads, head_dim]
        self._sum = torch.zeros(capacity, spec.num_layers, spec.num_kv_heads, spec.head_dim, device=device)
        self._sumsq = torch.zeros_like(self._sum)
        self._count = torch.zeros(capacity, device=device)

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, cluster_id: str, keys: torch.Tensor) -> None:
        """Adds keys ``[num_layers, num_kv_heads, n, head_dim]`` to a cluster's row (creating it)."""
        row = self._rows.get(cluster_id)
        if row is None:
            row = self._new_row(cluster_id)
        keys = keys.float()
        self._sum[row] += keys.sum(dim=2)
        self._sumsq[row] += keys.square().sum(dim=2)
        self._count[row] += keys.shape[2]
        self._num_tokens[cluster_id] = self._num_tokens.get(cluster_id, 0) + keys.shape[2]

    def add_stats(self, cluster_id: str, key_sum: torch.Tensor, key_sumsq: torch.Tensor, count: float) -> None:
        """Restores a cluster's row from saved statistics ``[num_layers, num_kv_heads, head_dim]``."""
        assert cluster_id not in self._rows, f"summary of {cluster_id} restored twice"
        row = self._new_row(cluster_id)
        self._sum[row] = key_sum.to(self.device, torch.float32)
        self._sumsq[row] = key_sumsq.to(self.device, torch.float32)
        self._count[row] = float(count)
        self._num_tokens[cluster_id] = round(count)

    def stats_of(self, cluster_id: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """A cluster's key sum and sum of squares (host copies) and its token count, for its durable record."""
        row = self._rows[cluster_id]
        return self._sum[row].cpu(), self._sumsq[row].cpu(), float(self._num_tokens[cluster_id])

    def merge(self, left_id: str, right_id: str, merged_id: str) -> None:
        left, right = self._rows.pop(left_id), self._rows.pop(right_id)
        self._ids[left] = self._ids[right] = None
        row = self._new_row(merged_id)
        self._num_tokens[merged_id] = self._num_tokens.pop(left_id) + self._num_tokens.pop(right_id)
        for stat in (self._sum, self._sumsq, self._count):
            stat[row] = stat[left] + stat[right]
            stat[left] = 0
            stat[right] = 0
        self._free_rows += [left, right]

    def remove(self, cluster_id: str) -> None:
        row = self._rows.pop(cluster_id)
        self._ids[row] = None
        del self._num_tokens[cluster_id]
        for stat in (self._sum, self._sumsq, self._count):
            stat[row] = 0
        self._free_rows.append(row)

    def count(self, cluster_id: str) -> int:
        """Tokens summarised for a cluster (its stored KV)."""
        return self._num_tokens[cluster_id]

    def rows(self, cluster_ids: list[str]) -> torch.Tensor:
        """Row indices of ``cluster_ids`` (valid until the next merge or removal)."""
        return torch.tensor([self._rows[c] for c in cluster_ids], device=self.device, dtype=torch.long)

    def all_layers(self, cluster_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Centroids and variances ``[C, num_layers, num_kv_heads, head_dim]`` and log-counts ``[C]``."""
        rows = self.rows(cluster_ids)
        count = self._count[rows].clamp_min(1.0)
        mean = self._sum[rows] / count[:, None, None, None]
        var = (self._sumsq[rows] / count[:, None, None, None] - mean.square()).clamp_min(0.0)
        return mean, var, count.log()

    def _new_row(self, cluster_id: str) -> int:
        if self._free_rows:
            row = self._free_rows.pop()
            self._ids[row] = cluster_id
            self._rows[cluster_id] = row
            return row
        row = len(self._ids)
        if row == self._sum.shape[0]:
            self._sum = _grow(self._sum)
            self._sumsq = _grow(self._sumsq)
            self._count = _grow(self._count)
        self._ids.append(cluster_id)
        self._rows[cluster_id] = row
        return row


def _grow(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, torch.zeros_like(t)])


def score_clusters(
    query: torch.Tensor,
    centroids: torch.Tensor,
    variances: torch.Tensor,
    log_counts: torch.Tensor,
    *,
    scale: float,
    use_spread: bool,
) -> torch.Tensor:
    """Scores every cluster for one layer; returns ``[C]`` float32.

    Args:
        query: ``[num_q_heads, num_q_tokens, head_dim]`` post-RoPE question queries.
        centroids, variances: ``[C, num_kv_heads, head_dim]``.
        log_counts: ``[C]``.
        use_spread: cluster mode (mass estimate) if True, token mode (centroid dot product) if False.

    Per KV head, the estimate is maximised over the head's query group and the query tokens; heads are then
    combined by log-sum-exp, i.e. the total estimated attention mass across heads. On CUDA, cluster mode's per-head
    estimate is the Triton scoring kernel (one launch for all clusters); elsewhere, and for token mode, torch.
    """
    if use_spread and query.is_cuda and kernels_ready():
        from mosaic_core.kernels.scoring import cluster_scores

        per_head = cluster_scores(query, centroids, variances, log_counts.float(), scale=scale)
    else:
        per_head = per_head_scores(query, centroids, variances, log_counts, scale=scale, use_spread=use_spread)
    return torch.logsumexp(per_head, dim=1)


def per_head_scores(
    query: torch.Tensor,
    centroids: torch.Tensor,
    variances: torch.Tensor,
    log_counts: torch.Tensor,
    *,
    scale: float,
    use_spread: bool,
) -> torch.Tensor:
    """The torch twin of the scoring kernel: ``[C, num_kv_heads]`` float32."""
    num_kv_heads = centroids.shape[1]
    group = query.shape[0] // num_kv_heads
    q = query.float().reshape(num_kv_heads, group * query.shape[1], -1)  # [H, G*T, D]
    dots = torch.einsum("hqd,chd->chq", q, centroids.float()) * scale  # [C, H, G*T]
    if use_spread:
        spread = torch.einsum("hqd,chd->chq", q.square(), variances.float()) * (0.5 * scale * scale)
        dots = dots + spread + log_counts.float()[:, None, None]
    return dots.amax(dim=2)
