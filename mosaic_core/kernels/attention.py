"""Split-K attention over long KV sets: decode (contiguous or paged) and causal prefill, with GQA.

One stage-1 kernel serves all three entry points. Its rows are (query token, q head) pairs of one kv group,
packed token-major so that every K/V tile it loads is shared by the whole group:

    row r of kv group g  ->  token t = r // group_size,  q head h = g * group_size + r % group_size
    grid = (cdiv(q_len * group_size, BLOCK_M), batch * num_kv_heads, num_splits)

Split s covers keys [s * split_tokens, (s + 1) * split_tokens). Query token t sees key j when
j < kv_len and j < kv_len - q_len + causal_shift + t + 1 (bottom-right causal; decode has q_len = 1, so it
sees all kv_len keys). Each split writes a normalized partial output and its log2-sum-exp; a second kernel
merges the splits (flash-decoding). With one split, stage 1 writes the final output and no merge runs.

Paged KV: key j of sequence b is at page page_table[b, j // PAGE_TOKENS], slot j % PAGE_TOKENS. A page id < 0
masks its keys, so -1 padding is never dereferenced. With a slot table (``paged_slot_attention``) the table names
each key's slot instead, page * PAGE_TOKENS + offset, so a sequence may read partly filled pages in any order.
"""

from __future__ import annotations

import math

import torch

from mosaic_core.errors import InvalidArgumentError
from mosaic_core.kernels import (
    cdiv,
    check_rank,
    interpret_mode,
    launchable,
    next_power_of_2,
)
from mosaic_core.kernels.attention_checks import (
    check_attention_args,
    check_kv_lens,
    check_page_table_args,
    check_pages_in_use,
    check_slot_args,
    out_4d,
)
from mosaic_core.kernels.attention_kernels import attention_merge_kernel, attention_partial_kernel
from mosaic_core.kernels.attention_plan import AttentionLaunch, AttentionTiles, kernel_config, plan_splits

_LOG2E = 1.4426950408889634
# Tests set this to fill the split workspace with NaN, so that any partial the first stage fails to write
# poisons the output instead of silently reading stale memory.
_POISON_WORKSPACE = False
# Elements of the [rows, splits, head_dim] tile one merge program holds: registers on a GPU; in the
# interpreter each program costs milliseconds whatever its size, so fewer, bigger ones.
_MERGE_TILE_ELEMS = 8192
_MERGE_TILE_ELEMS_INTERPRETED = 1 << 18


def _workspace(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if _POISON_WORKSPACE:
        return torch.full(shape, math.nan, dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def _run(
    launch: AttentionLaunch,
    q4: torch.Tensor,  # [batch, num_q_heads, q_len, head_dim] (view)
    k: torch.Tensor,  # [batch or num_pages, num_kv_heads, tokens, head_dim]
    v: torch.Tensor,
    page_table: torch.Tensor | None,  # [batch, max_pages]
    kv_lens: torch.Tensor | None,  # [batch]
    out4: torch.Tensor,  # [batch, num_q_heads, q_len, head_dim] (view of the caller's out)
    *,
    scale: float,
    num_splits: int | None,
    block_n: int | None,
    tiles: AttentionTiles | None = None,
    keep_lse: bool = False,
) -> torch.Tensor | None:
    """Launches stage 1, then the merge when there are several splits. With ``keep_lse`` every split's
    log2-sum-exp is kept and returned, ``[batch, num_q_heads, q_len, splits]``, and ``out4`` is left unwritten."""
    rows = launch.q_len * launch.group_size
    config = tiles or kernel_config(launch)
    block_m, block_n = config.block_m, block_n or config.block_n
    splits, split_tokens = plan_splits(launch, block_m, block_n, num_splits, q4.device)
    if splits == 1 and not keep_lse:
        part, lse = out4.unsqueeze(3), None  # stage 1 writes the final output; split stride is unused
    else:
        shape = (launch.batch, launch.num_q_heads, launch.q_len, splits)
        part = _workspace((*shape, launch.head_dim), q4.device)
        lse = _workspace(shape, q4.device)
    dummy = kv_lens if kv_lens is not None else q4  # never dereferenced when its flag is off
    pt_strides = page_table.stride() if page_table is not None else (0, 0)
    grid = (cdiv(rows, block_m), launch.batch * launch.num_kv_heads, splits)
    launchable(attention_partial_kernel)[grid](
        q4, k, v, page_table if page_table is not None else dummy, dummy, part,
        lse if lse is not None else part,
        launch.q_len, launch.num_kv_heads, launch.max_kv_tokens, launch.causal_shift, split_tokens,
        launch.head_dim, scale * _LOG2E,
        *q4.stride(), *k.stride(), *v.stride(), *pt_strides, *part.stride(),
        *(lse.stride() if lse is not None else (0, 0, 0, 0)),
        GROUP_SIZE=launch.group_size, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, next_power_of_2(launch.head_dim)),
        PAGED=page_table is not None, PAGE_TOKENS=max(launch.page_tokens, 1), SLOTS=launch.slots,
        HAS_KV_LENS=kv_lens is not None,
        STORE_LSE=lse is not None, DOT_IN_FP32=interpret_mode() and q4.dtype == torch.bfloat16,
        INPUT_PRECISION="ieee" if q4.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if keep_lse:
        return lse
    if lse is not None:
        num_rows = launch.batch * launch.num_q_heads * launch.q_len
        block_s, block_d = next_power_of_2(splits), max(16, next_power_of_2(launch.head_dim))
        tile_elems = _MERGE_TILE_ELEMS_INTERPRETED if interpret_mode() else _MERGE_TILE_ELEMS
        block_r = max(1, min(next_power_of_2(num_rows), tile_elems // (block_s * block_d)))
        launchable(attention_merge_kernel)[(cdiv(num_rows, block_r),)](
            part, lse, out4, num_rows, launch.num_q_heads, launch.q_len, splits, launch.head_dim,
            *out4.stride(), BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return None


def decode_attention(
    q: torch.Tensor,  # [batch, num_q_heads, head_dim]
    k: torch.Tensor,  # [batch, num_kv_heads, max_kv, head_dim]
    v: torch.Tensor,  # [batch, num_kv_heads, max_kv, head_dim]
    kv_lens: torch.Tensor | None = None,  # [batch] int32
    *,
    scale: float,
    out: torch.Tensor | None = None,  # [batch, num_q_heads, head_dim]
    num_splits: int | None = None,
    block_n: int | None = None,
    validate: bool = True,
) -> torch.Tensor:  # [batch, num_q_heads, head_dim]
    """Attention of one new token per sequence over a long padded KV set, split over keys (flash-decoding).

    Args:
        q: The new token's queries; float16/bfloat16/float32, any strides (as are k and v).
        k: Keys, padded to ``max_kv``; q head ``h`` reads kv head ``h // (num_q_heads // num_kv_heads)``.
        v: Values, same shape as ``k``.
        kv_lens: Valid keys per sequence (default: all ``max_kv``). A sequence with 0 keys gets zeros.
        scale: Softmax scale.
        out: Optional output in ``q``'s dtype.
        num_splits: Key splits (default: enough programs to fill the GPU twice).
        block_n: Keys per inner step (power of two, >= 16).
        validate: Check the ``kv_lens`` values; this synchronizes with the device.

    Returns:
        The attention output in ``q``'s dtype; float32 accumulation.

    Raises:
        InvalidArgumentError: On mismatched shapes, dtypes or devices, or ``kv_lens`` outside [0, max_kv].
    """
    check_rank("q", q, 3, "[batch, num_q_heads, head_dim]")
    check_rank("k", k, 4, "[batch, num_kv_heads, max_kv, head_dim]")
    check_attention_args(q, k, v, q.shape[1], k.shape[1], scale)
    if k.shape[0] != q.shape[0]:
        raise InvalidArgumentError(f"batch differs: q {tuple(q.shape)} vs k {tuple(k.shape)}")
    if kv_lens is not None:
        check_kv_lens(kv_lens, q.shape[0], k.shape[2], q.device, validate)
    out = out_4d(out, tuple(q.shape), q)
    launch = AttentionLaunch(
        batch=q.shape[0], num_q_heads=q.shape[1], num_kv_heads=k.shape[1], q_len=1, head_dim=q.shape[2],
        max_kv_tokens=k.shape[2], causal_shift=0, page_tokens=0,
    )  # fmt: skip
    if out.numel():
        _run(launch, q.unsqueeze(2), k, v, None, kv_lens, out.unsqueeze(2), scale=scale,
             num_splits=num_splits, block_n=block_n)  # fmt: skip
    return out


def paged_decode_attention(
    q: torch.Tensor,  # [batch, num_q_heads, head_dim]
    k_pages: torch.Tensor,  # [num_pages, num_kv_heads, page_tokens, head_dim]
    v_pages: torch.Tensor,  # [num_pages, num_kv_heads, page_tokens, head_dim]
    page_table: torch.Tensor,  # [batch, max_pages] int32, -1 padded
    kv_lens: torch.Tensor,  # [batch] int32
    *,
    scale: float,
    out: torch.Tensor | None = None,  # [batch, num_q_heads, head_dim]
    num_splits: int | None = None,
    block_n: int | None = None,
    validate: bool = True,
) -> torch.Tensor:  # [batch, num_q_heads, head_dim]
    """Decode attention over KV scattered in pages, read in place through a page table (no gather copy).

    Key ``j`` of sequence ``b`` is slot ``j % page_tokens`` of page ``page_table[b, j // page_tokens]``; this
    is how retrieved clusters that are not contiguous in the GPU pool are attended.

    Args:
        q: The new token's queries; float16/bfloat16/float32.
        k_pages: Key pages of the pool; any strides (as are v_pages).
        v_pages: Value pages, same shape as ``k_pages``.
        page_table: Pages of each sequence in key order; entries past a sequence's last page are ignored.
        kv_lens: Valid keys per sequence, at most ``max_pages * page_tokens``.
        scale: Softmax scale.
        out: Optional output in ``q``'s dtype.
        num_splits: Key splits (default: enough programs to fill the GPU twice).
        block_n: Keys per inner step (power of two, >= 16).
        validate: Check ``kv_lens`` and the page ids in use; this synchronizes with the device.

    Returns:
        The attention output in ``q``'s dtype; float32 accumulation.

    Raises:
        InvalidArgumentError: On mismatched shapes, dtypes or devices, or lengths or page ids out of range.
    """
    check_page_table_args(q, k_pages, v_pages, page_table, scale)
    batch, page_tokens = q.shape[0], k_pages.shape[2]
    max_tokens = page_table.shape[1] * page_tokens
    check_kv_lens(kv_lens, batch, max_tokens, q.device, validate)
    if validate and batch:
        check_pages_in_use(page_table, kv_lens, k_pages)
    out = out_4d(out, tuple(q.shape), q)
    launch = AttentionLaunch(
        batch=batch, num_q_heads=q.shape[1], num_kv_heads=k_pages.shape[1], q_len=1, head_dim=q.shape[2],
        max_kv_tokens=max_tokens, causal_shift=0, page_tokens=page_tokens,
    )  # fmt: skip
    if out.numel():
        _run(launch, q.unsqueeze(2), k_pages, v_pages, page_table, kv_lens, out.unsqueeze(2), scale=scale,
             num_splits=num_splits, block_n=block_n)  # fmt: skip
    return out


def prefill_attention(
    q: torch.Tensor,  # [num_q_heads, q_len, head_dim]
    k: torch.Tensor,  # [num_kv_heads, kv_len, head_dim]
    v: torch.Tensor,  # [num_kv_heads, kv_len, head_dim]
    *,
    scale: float,
    causal_offset: int | None = None,
    out: torch.Tensor | None = None,  # [num_q_heads, q_len, head_dim]
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:  # [num_q_heads, q_len, head_dim]
    """Causal attention of ``q_len`` new tokens over ``kv_len`` keys that end with those tokens.

    Bottom-right aligned: query ``i`` sees keys ``j <= causal_offset + i``, with ``causal_offset`` defaulting
    to ``kv_len - q_len`` (all the past plus causal among the new tokens).

    Args:
        q: Queries of the new tokens; float16/bfloat16/float32, any strides (as are k and v).
        k: Keys (past, then the new tokens); GQA as in :func:`decode_attention`.
        v: Values, same shape as ``k``.
        scale: Softmax scale.
        causal_offset: Keys visible to query 0 minus one; must be >= 0.
        out: Optional output in ``q``'s dtype.
        num_splits: Key splits (default: enough programs to fill the GPU twice).
        block_n: Keys per inner step (power of two, >= 16).

    Returns:
        The attention output in ``q``'s dtype; float32 accumulation.

    Raises:
        InvalidArgumentError: On mismatched shapes, dtypes or devices, or a negative ``causal_offset``.
    """
    check_rank("q", q, 3, "[num_q_heads, q_len, head_dim]")
    check_rank("k", k, 3, "[num_kv_heads, kv_len, head_dim]")
    check_attention_args(q, k, v, q.shape[0], k.shape[0], scale)
    q_len, kv_len = q.shape[1], k.shape[1]
    offset = kv_len - q_len if causal_offset is None else causal_offset
    if offset < 0:
        raise InvalidArgumentError(
            f"causal_offset={offset} must be >= 0 (q {tuple(q.shape)}, k {tuple(k.shape)}): a query would see no key"
        )
    out = out_4d(out, tuple(q.shape), q)
    launch = AttentionLaunch(
        batch=1, num_q_heads=q.shape[0], num_kv_heads=k.shape[0], q_len=q_len, head_dim=q.shape[2],
        max_kv_tokens=kv_len, causal_shift=offset - (kv_len - q_len), page_tokens=0,
    )  # fmt: skip
    if out.numel():
        _run(launch, q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), None, None, out.unsqueeze(0),
             scale=scale, num_splits=num_splits, block_n=block_n)  # fmt: skip
    return out


def paged_slot_attention(
    q: torch.Tensor,  # [batch, num_q_heads, q_len, head_dim]
    k_pages: torch.Tensor,  # [num_pages, num_kv_heads, page_tokens, head_dim]
    v_pages: torch.Tensor,  # [num_pages, num_kv_heads, page_tokens, head_dim]
    slot_table: torch.Tensor,  # [batch, max_keys] int32: page * page_tokens + offset, -1 padded
    kv_lens: torch.Tensor | None,  # [batch] int32; None: every sequence has max_keys keys
    *,
    scale: float,
    out: torch.Tensor | None = None,  # [batch, num_q_heads, q_len, head_dim]
    num_splits: int | None = None,
    block_n: int | None = None,
    tiles: AttentionTiles | None = None,
) -> torch.Tensor:  # [batch, num_q_heads, q_len, head_dim]
    """Causal attention of ``q_len`` new tokens per sequence over keys read in place from a page pool.

    Key ``j`` of sequence ``b`` is token ``slot_table[b, j] % page_tokens`` of page
    ``slot_table[b, j] // page_tokens``; the new tokens' own keys are the last ``q_len`` of the ``kv_lens[b]``
    keys (bottom-right causal, as in :func:`prefill_attention`). With ``q_len == 1`` this is decode. Nothing is
    gathered: the kernel reads the pool where it is, so pages may be partly filled and in any order. ``tiles``
    replaces the tile sizes and launch shape that ``kernel_config`` picks (for sweeps).

    Raises:
        InvalidArgumentError: On mismatched shapes, dtypes or devices.
    """
    check_rank("q", q, 4, "[batch, num_q_heads, q_len, head_dim]")
    check_slot_args(q, k_pages, v_pages, slot_table, scale)
    batch, q_len = q.shape[0], q.shape[2]
    if kv_lens is not None:
        check_kv_lens(kv_lens, batch, slot_table.shape[1], q.device, validate=False)
    out = out_4d(out, tuple(q.shape), q)
    launch = AttentionLaunch(
        batch=batch, num_q_heads=q.shape[1], num_kv_heads=k_pages.shape[1], q_len=q_len, head_dim=q.shape[3],
        max_kv_tokens=slot_table.shape[1], causal_shift=0, page_tokens=k_pages.shape[2], slots=True,
    )  # fmt: skip
    if out.numel():
        _run(launch, q, k_pages, v_pages, slot_table, kv_lens, out, scale=scale,
             num_splits=num_splits, block_n=block_n, tiles=tiles)  # fmt: skip
    return out


def paged_slot_logsumexp(
    q: torch.Tensor,  # [num_q_heads, q_len, head_dim]
    k_pages: torch.Tensor,  # [num_pages, num_kv_heads, page_tokens, head_dim]
    v_pages: torch.Tensor,  # [num_pages, num_kv_heads, page_tokens, head_dim]
    slot_table: torch.Tensor,  # [1, num_keys] int32: page * page_tokens + offset
    *,
    scale: float,
) -> torch.Tensor:  # [num_q_heads, q_len] float32
    """Each query row's log-sum-exp of its scaled logits over every key the slot table names, read in place from
    the page pool: ``log sum_j exp(scale * <q, k_j>)``, natural log. No causal mask: every row sees every key.

    This is the softmax normaliser the attention kernel computes on the way, so it is the attention kernel's
    stage 1 (values are read and the partial outputs dropped) with the causal shift moved past the last key and
    every split's log2-sum-exp kept; the splits are combined here.

    Raises:
        InvalidArgumentError: On mismatched shapes, dtypes or devices.
    """
    check_rank("q", q, 3, "[num_q_heads, q_len, head_dim]")
    q4 = q.unsqueeze(0)
    check_slot_args(q4, k_pages, v_pages, slot_table, scale)
    num_q_heads, q_len, head_dim = q.shape
    if slot_table.shape[1] == 0 or q.numel() == 0:
        return torch.full((num_q_heads, q_len), -math.inf, dtype=torch.float32, device=q.device)
    launch = AttentionLaunch(
        batch=1, num_q_heads=num_q_heads, num_kv_heads=k_pages.shape[1], q_len=q_len, head_dim=head_dim,
        max_kv_tokens=slot_table.shape[1], causal_shift=q_len, page_tokens=k_pages.shape[2], slots=True,
    )  # fmt: skip
    lse2 = _run(launch, q4, k_pages, v_pages, slot_table, None, q4, scale=scale, num_splits=None, block_n=None,
                keep_lse=True)  # fmt: skip
    return torch.logsumexp(lse2[0] * math.log(2.0), dim=-1)
