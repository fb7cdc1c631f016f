"""Plain-torch twins of the Triton kernels: the ground truth that tests and benchmarks compare against.

Every reference computes in float32 (attention and scoring return float32) and favours obviousness over
speed. ``copy_spans_reference`` is also the page-by-page transfer path the gather kernels compete with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IndexLike = torch.Tensor | Sequence[int]


def cluster_scores_reference(
    query: torch.Tensor,  # [num_q_heads, num_q_tokens, head_dim]
    centroids: torch.Tensor,  # [num_clusters, num_kv_heads, head_dim]
    variances: torch.Tensor,  # [num_clusters, num_kv_heads, head_dim]
    log_counts: torch.Tensor,  # [num_clusters]
    *,
    scale: float,
    use_spread: bool = True,
) -> torch.Tensor:  # [num_clusters, num_kv_heads] float32
    """Max over the q heads of each kv group and over the query tokens of the Gaussian log-mass estimate
    (``cluster_row_estimates``)."""
    est = cluster_row_estimates(query, centroids, variances, log_counts, scale=scale, use_spread=use_spread)
    return est.amax(dim=1).transpose(0, 1)  # [C, G]


def cluster_row_estimates(
    query: torch.Tensor,  # [num_q_heads, num_q_tokens, head_dim]
    centroids: torch.Tensor,  # [num_clusters, num_kv_heads, head_dim]
    variances: torch.Tensor,  # [num_clusters, num_kv_heads, head_dim]
    log_counts: torch.Tensor,  # [num_clusters]
    *,
    scale: float,
    use_spread: bool = True,
) -> torch.Tensor:  # [num_kv_heads, group_size * num_q_tokens, num_clusters] float32
    """The Gaussian log-mass estimate of every cluster for every query row, rows grouped by kv head (q head
    ``h`` reads kv head ``h // group_size``, its rows head-major):

    est = log_count + scale * <q, mu> + 0.5 * scale^2 * sum_d q_d^2 * var_d
    With ``use_spread=False`` only the mean-key term ``scale * <q, mu>`` (ReKV / InfLLM block scoring).
    """
    q = grouped_rows(query, centroids.shape[1])  # [G, R, D]
    mu = centroids.float().permute(1, 2, 0)  # [G, D, C]
    est = scale * torch.bmm(q, mu)  # [G, R, C]
    if not use_spread:
        return est
    var = variances.float().permute(1, 2, 0)  # [G, D, C]
    est = est + (0.5 * scale * scale) * torch.bmm(q * q, var)
    return est + log_counts.float()[None, None, :]


def grouped_rows(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``query`` ``[num_q_heads, T, D]`` as float32 rows per kv head, ``[num_kv_heads, group_size * T, D]``."""
    num_q_heads, num_q_tokens, head_dim = query.shape
    group_size = num_q_heads // num_kv_heads
    return query.float().reshape(num_kv_heads, group_size * num_q_tokens, head_dim)


def gather_rows_reference(
    src: torch.Tensor,  # [num_rows, row_elems]
    row_ids: torch.Tensor,  # [n]
    out: torch.Tensor | None = None,  # [n, row_elems]
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:  # [n, row_elems]
    """Gathers rows on the host side, then moves them in one copy (the CPU-gather-then-copy path)."""
    rows = src.index_select(0, row_ids.to(src.device, torch.int64))
    if out is None:
        return rows.to(device if device is not None else src.device)
    out.copy_(rows)
    return out


def _as_int_list(values: IndexLike) -> list[int]:
    return [int(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]


def copy_spans_reference(
    src: torch.Tensor,  # [num_rows, row_elems]
    span_starts: IndexLike,  # [num_spans]
    span_lengths: IndexLike,  # [num_spans]
    out: torch.Tensor | None = None,  # [sum(span_lengths), row_elems]
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Packs spans of rows into ``out`` with one ``copy_`` per span (the page-by-page transfer path).

    From pinned host memory the copies are ``non_blocking``; the caller synchronizes before reading ``out``
    on the host.
    """
    starts = _as_int_list(span_starts)
    lengths = _as_int_list(span_lengths)
    if out is None:
        target = torch.device(device) if device is not None else src.device
        out = torch.empty((sum(lengths), src.shape[1]), dtype=src.dtype, device=target)
    offset = 0
    for start, length in zip(starts, lengths, strict=True):
        out[offset : offset + length].copy_(src[start : start + length], non_blocking=True)
        offset += length
    return out


def _masked_attention(
    q: torch.Tensor,  # [num_q_heads, q_len, head_dim]
    k: torch.Tensor,  # [num_kv_heads, kv_len, head_dim]
    v: torch.Tensor,  # [num_kv_heads, kv_len, head_dim]
    visible: torch.Tensor,  # [q_len, kv_len] bool
    scale: float,
) -> torch.Tensor:  # [num_q_heads, q_len, head_dim] float32
    group_size = q.shape[0] // k.shape[0]
    k = k.float().repeat_interleave(group_size, dim=0)
    v = v.float().repeat_interleave(group_size, dim=0)
    scores = scale * torch.matmul(q.float(), k.transpose(1, 2))  # [num_q_heads, q_len, kv_len]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A query that sees no key gets zeros (softmax would give NaN); the kernels do the same.
    probs = torch.nan_to_num(probs, nan=0.0)
    return torch.matmul(probs, v)


def prefill_attention_reference(
    q: torch.Tensor,  # [num_q_heads, q_len, head_dim]
    k: torch.Tensor,  # [num_kv_heads, kv_len, head_dim]
    v: torch.Tensor,  # [num_kv_heads, kv_len, head_dim]
    *,
    scale: float,
    causal_offset: int | None = None,
) -> torch.Tensor:  # [num_q_heads, q_len, head_dim] float32
    """Causal attention: query i sees keys j <= causal_offset + i (default offset: kv_len - q_len)."""
    q_len, kv_len = q.shape[1], k.shape[1]
    offset = kv_len - q_len if causal_offset is None else causal_offset
    rows = torch.arange(q_len, device=q.device)[:, None]
    cols = torch.arange(kv_len, device=q.device)[None, :]
    return _masked_attention(q, k, v, cols <= rows + offset, scale)


def decode_attention_reference(
    q: torch.Tensor,  # [batch, num_q_heads, head_dim]
    k: torch.Tensor,  # [batch, num_kv_heads, max_kv, head_dim]
    v: torch.Tensor,  # [batch, num_kv_heads, max_kv, head_dim]
    kv_lens: torch.Tensor | None = None,  # [batch]
    *,
    scale: float,
) -> torch.Tensor:  # [batch, num_q_heads, head_dim] float32
    """One new token per sequence attends to the first ``kv_lens[b]`` keys of its padded KV."""
    max_kv = k.shape[2]
    lens = [max_kv] * q.shape[0] if kv_lens is None else _as_int_list(kv_lens)
    outs = []
    for b, kv_len in enumerate(lens):
        visible = torch.ones((1, kv_len), dtype=torch.bool, device=q.device)
        outs.append(_masked_attention(q[b, :, None], k[b, :, :kv_len], v[b, :, :kv_len], visible, scale))
    return torch.stack(outs)[:, :, 0]


def paged_decode_attention_reference(
    q: torch.Tensor,  # [batch, num_q_heads, head_dim]
    k_pages: torch.Tensor,  # [num_pages, num_kv_heads, page_tokens, head_dim]
    v_pages: torch.Tensor,  # [num_pages, num_kv_heads, page_tokens, head_dim]
    page_table: torch.Tensor,  # [batch, max_pages], -1 padded
    kv_lens: torch.Tensor,  # [batch]
    *,
    scale: float,
) -> torch.Tensor:  # [batch, num_q_heads, head_dim] float32
    """Token j of sequence b lives in page ``page_table[b, j // page_tokens]`` at slot ``j % page_tokens``."""
    page_tokens = k_pages.shape[2]
    outs = []
    for b, kv_len in enumerate(_as_int_list(kv_lens)):
        num_used = -(-kv_len // page_tokens)
        pages = page_table[b, :num_used].to(torch.int64)
        # [num_used, kv_heads, page_tokens, head_dim] -> [kv_heads, num_used * page_tokens, head_dim]
        k = k_pages[pages].transpose(0, 1).flatten(1, 2)[:, :kv_len]
        v = v_pages[pages].transpose(0, 1).flatten(1, 2)[:, :kv_len]
        visible = torch.ones((1, kv_len), dtype=torch.bool, device=q.device)
        outs.append(_masked_attention(q[b, :, None], k, v, visible, scale))
    return torch.stack(outs)[:, :, 0]


def slot_keys(pages: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Keys (or values) at ``slots`` of a page pool ``[num_pages, H, page_tokens, D]``: ``[H, len(slots), D]``."""
    slots = slots.to(pages.device, torch.int64)
    page_tokens = pages.shape[2]
    return pages[slots // page_tokens, :, slots % page_tokens].transpose(0, 1)


def paged_slot_attention_reference(
    q: torch.Tensor,  # [batch, num_q_heads, q_len, head_dim]
    k_pages: torch.Tensor,  # [num_pages, num_kv_heads, page_tokens, head_dim]
    v_pages: torch.Tensor,  # [num_pages, num_kv_heads, page_tokens, head_dim]
    slot_table: torch.Tensor,  # [batch, max_keys]
    kv_lens: torch.Tensor,  # [batch]
    *,
    scale: float,
) -> torch.Tensor:  # [batch, num_q_heads, q_len, head_dim] float32
    """Key j of sequence b is at slot ``slot_table[b, j]`` (page * page_tokens + offset); bottom-right causal."""
    outs = []
    for b, kv_len in enumerate(_as_int_list(kv_lens)):
        slots = slot_table[b, :kv_len]
        k, v = slot_keys(k_pages, slots), slot_keys(v_pages, slots)
        outs.append(prefill_attention_reference(q[b], k, v, scale=scale))
    return torch.stack(outs)


def paged_slot_logsumexp_reference(
    q: torch.Tensor,  # [num_q_heads, q_len, head_dim]
    k_pages: torch.Tensor,  # [num_pages, num_kv_heads, page_tokens, head_dim]
    slot_table: torch.Tensor,  # [1, num_keys]
    *,
    scale: float,
) -> torch.Tensor:  # [num_q_heads, q_len] float32
    """Each query row's ``log sum_j exp(scale * <q, k_j>)`` over the keys at ``slot_table``'s slots (gathered
    first: a copy), rows of q head ``h`` against kv head ``h // group_size``."""
    keys = slot_keys(k_pages, slot_table[0]).float()  # [num_kv_heads, num_keys, head_dim]
    num_kv_heads = keys.shape[0]
    logits = scale * torch.bmm(grouped_rows(q, num_kv_heads), keys.transpose(1, 2))  # [G, R, num_keys]
    return torch.logsumexp(logits, dim=2).reshape(q.shape[0], q.shape[1])
