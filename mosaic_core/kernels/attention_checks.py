"""The argument checks of the split-K attention entry points (``kernels.attention``): each refuses what the kernels
cannot read with an InvalidArgumentError that names the argument."""

from __future__ import annotations

import math

import torch

from mosaic_core.errors import InvalidArgumentError
from mosaic_core.kernels import check_float_dtype, check_index_dtype, check_kernel_device, check_out, check_rank


def check_attention_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_q_heads: int, num_kv_heads: int, scale: float
) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_float_dtype(name, tensor)
        check_kernel_device(name, tensor, q.device)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise InvalidArgumentError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if v.shape != k.shape:
        raise InvalidArgumentError(f"v {tuple(v.shape)} must match k {tuple(k.shape)}")
    if q.shape[-1] != k.shape[-1] or q.shape[-1] == 0:
        raise InvalidArgumentError(f"head_dim differs or is 0: q {tuple(q.shape)} vs k {tuple(k.shape)}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise InvalidArgumentError(
            f"num_q_heads={num_q_heads} (q {tuple(q.shape)}) is not a multiple of "
            f"num_kv_heads={num_kv_heads} (k {tuple(k.shape)})"
        )
    if not math.isfinite(scale):
        raise InvalidArgumentError(f"scale must be finite, got {scale}")


def check_slot_args(
    q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, slot_table: torch.Tensor, scale: float
) -> None:
    """The checks of the slot-table entry points; ``q`` ``[batch, num_q_heads, q_len, head_dim]``."""
    check_rank("k_pages", k_pages, 4, "[num_pages, num_kv_heads, page_tokens, head_dim]")
    check_rank("slot_table", slot_table, 2, "[batch, max_keys]")
    check_attention_args(q, k_pages, v_pages, q.shape[1], k_pages.shape[1], scale)
    check_index_dtype("slot_table", slot_table)
    check_kernel_device("slot_table", slot_table, q.device)
    if slot_table.shape[0] != q.shape[0]:
        raise InvalidArgumentError(f"slot_table {tuple(slot_table.shape)} must have batch={q.shape[0]} rows")


def check_page_table_args(
    q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor, scale: float
) -> None:
    """The checks of the page-table entry point; ``q`` ``[batch, num_q_heads, head_dim]``."""
    check_rank("q", q, 3, "[batch, num_q_heads, head_dim]")
    check_rank("k_pages", k_pages, 4, "[num_pages, num_kv_heads, page_tokens, head_dim]")
    check_rank("page_table", page_table, 2, "[batch, max_pages]")
    check_attention_args(q, k_pages, v_pages, q.shape[1], k_pages.shape[1], scale)
    check_index_dtype("page_table", page_table)
    check_kernel_device("page_table", page_table, q.device)
    batch, page_tokens = q.shape[0], k_pages.shape[2]
    if page_table.shape[0] != batch or page_tokens == 0:
        raise InvalidArgumentError(
            f"page_table {tuple(page_table.shape)} must have batch={batch} rows (q {tuple(q.shape)}), "
            f"k_pages {tuple(k_pages.shape)} must have page_tokens > 0"
        )


def check_pages_in_use(page_table: torch.Tensor, kv_lens: torch.Tensor, k_pages: torch.Tensor) -> None:
    """Refuses a page id outside ``k_pages`` among the pages ``kv_lens`` reaches; synchronizes with the device."""
    page_tokens = k_pages.shape[2]
    used = torch.arange(page_table.shape[1], device=page_table.device)[None, :] * page_tokens < kv_lens[:, None]
    pages = page_table[used]
    if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= k_pages.shape[0]):
        raise InvalidArgumentError(
            f"page ids in use span [{int(pages.min())}, {int(pages.max())}], outside the "
            f"{k_pages.shape[0]} pages of k_pages {tuple(k_pages.shape)}"
        )


def check_kv_lens(kv_lens: torch.Tensor, batch: int, max_tokens: int, device: torch.device, validate: bool) -> None:
    check_rank("kv_lens", kv_lens, 1, "[batch]")
    check_index_dtype("kv_lens", kv_lens)
    check_kernel_device("kv_lens", kv_lens, device)
    if kv_lens.shape[0] != batch:
        raise InvalidArgumentError(f"kv_lens {tuple(kv_lens.shape)} must have batch={batch} entries")
    if validate and batch and (int(kv_lens.min()) < 0 or int(kv_lens.max()) > max_tokens):
        raise InvalidArgumentError(f"kv_lens {kv_lens.tolist()} must lie in [0, {max_tokens}]")


def out_4d(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    check_out(out, shape, like.dtype, like.device)
    return out
