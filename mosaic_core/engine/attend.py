"""Attention of new tokens over a past KV set plus themselves (causal among the new ones).

Layout of what one row attends to, for ``T`` new tokens over ``S`` past tokens:

    keys:   [ past_0 ... past_{S-1} | new_0 ... new_{T-1} ]
    new_i sees every past token and new_0..new_i   (bottom-right aligned causal mask)

The past (sink + window, retrieved clusters, earlier answer tokens) needs no order: RoPE is already applied to
the stored keys, so attention is order-free over them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mosaic_core.kernels import kernels_ready


def causal_mask(num_new: int, num_all: int, device: torch.device) -> torch.Tensor | None:
    """``[num_new, num_all]`` bottom-right causal mask, or None when one new token sees everything."""
    if num_new == 1:
        return None
    new_idx = torch.arange(num_new, device=device)[:, None]
    key_idx = torch.arange(num_all, device=device)[None, :]
    return key_idx <= new_idx + (num_all - num_new)


def attend_over(query: torch.Tensor, kv: torch.Tensor, num_new: int, scale: float) -> torch.Tensor:
    """Attention of the last ``num_new`` tokens of ``kv`` ``[2, H, S, D]`` (whose queries are ``query``
    ``[num_q_heads, num_new, D]``) over all of ``kv``, causal among the new ones; returns ``[num_new, Hq, D]``.

    On CUDA this is the Triton split-K kernel: against SDPA with the explicit bottom-right mask it needs, it
    measured 0.029 ms vs 0.345 ms for 32 question tokens over 16k keys on an H200, each in a CUDA graph
    (bench/kernels_bench.py; bench/results/h200-kernels-session4.txt).
    """
    if query.is_cuda and kernels_ready():
        from mosaic_core.kernels.attention import prefill_attention

        out = prefill_attention(query, kv[0], kv[1], scale=scale)
        return out.to(query.dtype).transpose(0, 1)
    mask = causal_mask(num_new, kv.shape[2], query.device)
    out = F.scaled_dot_product_attention(
        query[None], kv[0][None], kv[1][None], attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out[0].transpose(0, 1)


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
        mask = causal_mask(query.shape[2], keys.shape[2], query.device)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.transpose(1, 2)
    rows = []
    for b, past in enumerate(pasts):
        new_kv = torch.stack([new_k[b], new_v[b]])  # [2, H, T, D]
        kv = new_kv if past is None else torch.cat([past.to(new_kv.dtype), new_kv], dim=2)
        rows.append(attend_over(query[b], kv, query.shape[2], scale))
    return torch.stack(rows)
