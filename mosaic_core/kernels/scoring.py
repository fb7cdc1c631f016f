"""Cluster scoring: how much attention mass the question's queries would put on each cluster.

A cluster summary is the mean ``mu`` and the diagonal variance ``var`` of its keys, per kv head. If the keys
of a cluster were Gaussian, the cluster's total attention logit mass for query ``q`` would be

    log sum_j exp(scale * <q, k_j>) ~= log_count + scale * <q, mu> + 0.5 * scale^2 * sum_d q_d^2 * var_d

(the log of the moment-generating function). Big clusters are not favoured blindly, because the count enters
as a log, and spread-out clusters get credit for the keys far from their mean.

Grid: one program per (block of ``BLOCK_C`` clusters, kv head). Each program holds its clusters' summaries
and sweeps the rows of its GQA group (group_size q heads x num_q_tokens tokens) in blocks of ``BLOCK_Q``:

    rows of group g:  r = (h - g * group_size) * num_q_tokens + t      (head-major)
    est[r, c] = q_r . (scale * mu_c) + (q_r * q_r) . (0.5 * scale^2 * var_c)     # two small matmuls
    out[c, g] = log_count_c + max_r est[r, c]
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mosaic_core.errors import InvalidArgumentError
from mosaic_core.kernels import (
    cdiv,
    check_float_dtype,
    check_kernel_device,
    check_out,
    check_rank,
    launchable,
    next_power_of_2,
)


@triton.jit
def cluster_scores_kernel(
    query_ptr, centroids_ptr, variances_ptr, log_counts_ptr, out_ptr,
    num_clusters, num_q_tokens, head_dim,
    q_head_stride, q_token_stride, q_dim_stride,
    c_cluster_stride, c_head_stride, c_dim_stride,
    var_cluster_stride, var_head_stride, var_dim_stride,
    log_counts_stride, out_cluster_stride, out_head_stride,
    scale,
    GROUP_SIZE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_SPREAD: tl.constexpr,
):  # fmt: skip
    kv_head = tl.program_id(1)
    clusters = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    cluster_mask = clusters < num_clusters
    dim_mask = dims < head_dim
    summary_mask = cluster_mask[:, None] & dim_mask[None, :]

    mu_ptrs = centroids_ptr + clusters[:, None] * c_cluster_stride + kv_head * c_head_stride
    mu = tl.load(mu_ptrs + dims[None, :] * c_dim_stride, mask=summary_mask, other=0.0)  # [BLOCK_C, BLOCK_D]
    # Fold the scales into the summaries once instead of into every score.
    mu_t = tl.trans(mu.to(tl.float32) * scale)  # [BLOCK_D, BLOCK_C]
    if USE_SPREAD:
        var_ptrs = variances_ptr + clusters[:, None] * var_cluster_stride + kv_head * var_head_stride
        var = tl.load(var_ptrs + dims[None, :] * var_dim_stride, mask=summary_mask, other=0.0)
        var_t = tl.trans(var.to(tl.float32) * (0.5 * scale * scale))  # [BLOCK_D, BLOCK_C]

    best = tl.full((BLOCK_C,), float("-inf"), dtype=tl.float32)
    num_rows = GROUP_SIZE * num_q_tokens
    for row_start in range(0, num_rows, BLOCK_Q):
        rows = row_start + tl.arange(0, BLOCK_Q)  # [BLOCK_Q]
        row_mask = rows < num_rows
        heads = kv_head * GROUP_SIZE + rows // num_q_tokens
        tokens = rows % num_q_tokens
        q_ptrs = query_ptr + heads[:, None] * q_head_stride + tokens[:, None] * q_token_stride
        q = tl.load(q_ptrs + dims[None, :] * q_dim_stride, mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        q = q.to(tl.float32)  # [BLOCK_Q, BLOCK_D]
        est = tl.dot(q, mu_t, input_precision="ieee")  # [BLOCK_Q, BLOCK_C]
        if USE_SPREAD:
            est += tl.dot(q * q, var_t, input_precision="ieee")
        est = tl.where(row_mask[:, None], est, float("-inf"))
        best = tl.maximum(best, tl.max(est, axis=0))

    if USE_SPREAD:
        log_counts = tl.load(log_counts_ptr + clusters * log_counts_stride, mask=cluster_mask, other=0.0)
        best += log_counts.to(tl.float32)
    out_ptrs = out_ptr + clusters * out_cluster_stride + kv_head * out_head_stride
    tl.store(out_ptrs, best, mask=cluster_mask)


def _check_scoring_args(
    query: torch.Tensor,
    centroids: torch.Tensor,
    variances: torch.Tensor,
    log_counts: torch.Tensor,
    scale: float,
) -> None:
    check_rank("query", query, 3, "[num_q_heads, num_q_tokens, head_dim]")
    check_rank("centroids", centroids, 3, "[num_clusters, num_kv_heads, head_dim]")
    check_rank("log_counts", log_counts, 1, "[num_clusters]")
    for name, tensor in (("query", query), ("centroids", centroids), ("variances", variances)):
        check_float_dtype(name, tensor)
        check_kernel_device(name, tensor, query.device)
    check_float_dtype("log_counts", log_counts)
    check_kernel_device("log_counts", log_counts, query.device)
    num_q_heads, num_q_tokens, head_dim = query.shape
    num_clusters, num_kv_heads, centroid_dim = centroids.shape
    if variances.shape != centroids.shape:
        raise InvalidArgumentError(f"variances {tuple(variances.shape)} must match centroids {tuple(centroids.shape)}")
    if log_counts.shape[0] != num_clusters:
        raise InvalidArgumentError(
            f"log_counts {tuple(log_counts.shape)} must have num_clusters={num_clusters} entries"
        )
    if centroid_dim != head_dim:
        raise InvalidArgumentError(
            f"head_dim differs: query {tuple(query.shape)} vs centroids {tuple(centroids.shape)}"
        )
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise InvalidArgumentError(
            f"num_q_heads={num_q_heads} (query {tuple(query.shape)}) is not a multiple of "
            f"num_kv_heads={num_kv_heads} (centroids {tuple(centroids.shape)})"
        )
    if num_q_tokens == 0 or head_dim == 0:
        raise InvalidArgumentError(f"query {tuple(query.shape)} has no tokens or no dims")
    if not math.isfinite(scale):
        raise InvalidArgumentError(f"scale must be finite, got {scale}")


def cluster_scores(
    query: torch.Tensor,  # [num_q_heads, num_q_tokens, head_dim]
    centroids: torch.Tensor,  # [num_clusters, num_kv_heads, head_dim]
    variances: torch.Tensor,  # [num_clusters, num_kv_heads, head_dim]
    log_counts: torch.Tensor,  # [num_clusters]
    *,
    scale: float,
    out: torch.Tensor | None = None,  # [num_clusters, num_kv_heads] float32
    block_c: int = 32,
    block_q: int = 32,
    use_spread: bool = True,
) -> torch.Tensor:  # [num_clusters, num_kv_heads] float32
    """Scores every cluster of one stream and layer against the question's queries, in one launch.

    Args:
        query: Post-RoPE question queries of one layer, float16/bfloat16/float32, any strides.
        centroids: Mean key of each cluster per kv head.
        variances: Diagonal key variance of each cluster per kv head (>= 0).
        log_counts: Natural log of the number of tokens in each cluster.
        scale: Softmax scale of the attention (usually ``head_dim ** -0.5``).
        out: Optional float32 output to write into.
        block_c: Clusters per program (power of two, >= 16).
        block_q: Query rows per inner step (power of two, >= 16).
        use_spread: False scores by the mean key alone (``scale * q.mu``, no variance or count term): ReKV's
            block scoring, in the same launch shape, so that baseline is not handicapped by a slower scorer.

    Returns:
        ``[num_clusters, num_kv_heads]`` float32: per cluster and kv head, the largest estimated log attention
        mass over the q heads of that kv head's group and over the query tokens. Accumulation is float32.

    Raises:
        InvalidArgumentError: On mismatched shapes, dtypes or devices.
    """
    _check_scoring_args(query, centroids, variances, log_counts, scale)
    num_q_heads, num_q_tokens, head_dim = query.shape
    num_clusters, num_kv_heads, _ = centroids.shape
    out_shape = (num_clusters, num_kv_heads)
    if out is None:
        out = torch.empty(out_shape, dtype=torch.float32, device=query.device)
    check_out(out, out_shape, torch.float32, query.device)
    if num_clusters == 0:
        return out
    grid = (cdiv(num_clusters, block_c), num_kv_heads)
    launchable(cluster_scores_kernel)[grid](
        query,
        centroids,
        variances,
        log_counts,
        out,
        num_clusters,
        num_q_tokens,
        head_dim,
        *query.stride(),
        *centroids.stride(),
        *variances.stride(),
        log_counts.stride(0),
        *out.stride(),
        float(scale),
        GROUP_SIZE=num_q_heads // num_kv_heads,
        BLOCK_C=block_c,
        BLOCK_Q=block_q,
        BLOCK_D=max(16, next_power_of_2(head_dim)),
        USE_SPREAD=use_spread,
        num_warps=4,
    )
    return out
