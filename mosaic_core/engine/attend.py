"""Attention of new tokens over a past KV set plus themselves (causal among the new ones).

Layout of what one row attends to, for ``T`` new tokens over ``S`` past tokens:

    keys:   [ past_0 ... past_{S-1} | new_0 ... new_{T-1} ]
    new_i sees every past token and new_0..new_i   (bottom-right aligned causal mask)

Past KV arrives as a list of pieces (sink, retrieved clusters, local window, earlier answer tokens): attention is
order-free over keys once RoPE is applied, so the pieces are simply concatenated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def concat_past(pieces: list[torch.Tensor]) -> torch.Tensor:
    """Concatenates ``[2, H, n_i, D]`` pieces along tokens into ``[2, H, sum n_i, D]``."""
    pieces = [p for p in pieces if p.shape[2] > 0]
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat(pieces, dim=2)


def attend_new_tokens(
    query: torch.Tensor, new_kv: torch.Tensor, past_kv: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """One row's attention.

    Args:
        query: ``[num_q_heads, T, D]``.
        new_kv: ``[2, num_kv_heads, T, D]``.
        past_kv: ``[2, num_kv_heads, S, D]`` or None.

    Returns:
        ``[T, num_q_heads, D]``.
    """
    kv = new_kv if past_kv is None else torch.cat([past_kv.to(new_kv.dtype), new_kv], dim=2)
    num_new, num_all = query.shape[1], kv.shape[2]
    mask = None
    if num_new > 1:
        new_idx = torch.arange(num_new, device=query.device)[:, None]
        key_idx = torch.arange(num_all, device=query.device)[None, :]
        mask = key_idx <= new_idx + (num_all - num_new)  # [T, S+T]
    out = F.scaled_dot_product_attention(
        query[None], kv[0][None], kv[1][None], attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out[0].transpose(0, 1)


def attend_over(query: torch.Tensor, kv: torch.Tensor, num_new: int, scale: float) -> torch.Tensor:
    """Attention of the last ``num_new`` tokens of ``kv`` ``[2, H, S, D]`` (whose queries are ``query``
    ``[num_q_heads, num_new, D]``) over all of ``kv``, causal among the new ones; returns ``[num_new, Hq, D]``.

    On CUDA this is the Triton split-K kernel: against SDPA with the explicit bottom-right mask it needs, it
    measured 0.030 ms vs 0.35 ms for 32 question tokens over 16k keys on an H200 (bench/kernels_bench.py).
    """
    if query.is_cuda and _kernels_ready():
        from mosaic_core.kernels.attention import prefill_attention

        out = prefill_attention(query, kv[0], kv[1], scale=scale)
        return out.to(query.dtype).transpose(0, 1)
    mask = None
    if num_new > 1:
        num_all = kv.shape[2]
        new_idx = torch.arange(num_new, device=query.device)[:, None]
        key_idx = torch.arange(num_all, device=query.device)[None, :]
        mask = key_idx <= new_idx + (num_all - num_new)
    out = F.scaled_dot_product_attention(
        query[None], kv[0][None], kv[1][None], attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out[0].transpose(0, 1)


def _kernels_ready() -> bool:
    from mosaic_core.kernels import triton_available

    return triton_available()


def attend_batch(
    query: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    pasts: list[torch.Tensor | None],
    scale: float,
) -> torch.Tensor:
    """Rows of possibly different past lengths; returns ``[B, T, num_q_heads, D]``.

    Rows whose pasts have equal length run as one batched call (the common case when several cameras ingest
    a frame each); others run row by row.
    """
    lengths = {None if p is None else p.shape[2] for p in pasts}
    if len(lengths) == 1 and None not in lengths and query.shape[0] > 1:
        past = torch.stack(pasts).to(new_k.dtype)  # [B, 2, H, S, D]
        keys = torch.cat([past[:, 0], new_k], dim=2)
        values = torch.cat([past[:, 1], new_v], dim=2)
        num_new, num_all = query.shape[2], keys.shape[2]
        new_idx = torch.arange(num_new, device=query.device)[:, None]
        key_idx = torch.arange(num_all, device=query.device)[None, :]
        mask = key_idx <= new_idx + (num_all - num_new)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.transpose(1, 2)
    rows = [
        attend_new_tokens(query[b], torch.stack([new_k[b], new_v[b]]), pasts[b], scale) for b in range(query.shape[0])
    ]
    return torch.stack(rows)
