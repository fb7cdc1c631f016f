"""The two Triton kernels of split-K attention; the wrappers that check arguments and launch them are in
:mod:`mosaic_core.kernels.attention`, whose docstring describes the row layout, the splits and the paging.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attention_partial_kernel(
    q_ptr, k_ptr, v_ptr, page_table_ptr, kv_lens_ptr, out_ptr, lse_ptr,
    q_len, num_kv_heads, max_kv_tokens, causal_shift, split_tokens, head_dim,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    q_batch_stride, q_head_stride, q_token_stride, q_dim_stride,
    k_batch_stride, k_head_stride, k_token_stride, k_dim_stride,  # batch stride = page stride when PAGED
    v_batch_stride, v_head_stride, v_token_stride, v_dim_stride,
    pt_batch_stride, pt_page_stride,
    out_batch_stride, out_head_stride, out_token_stride, out_split_stride, out_dim_stride,
    lse_batch_stride, lse_head_stride, lse_token_stride, lse_split_stride,
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGED: tl.constexpr, PAGE_TOKENS: tl.constexpr, SLOTS: tl.constexpr,  # SLOTS: the table names every key's slot
    HAS_KV_LENS: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # the interpreter multiplies bfloat16 as raw integers, so upcast there
    INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    batch = (tl.program_id(1) // num_kv_heads).to(tl.int64)  # int64: batch * stride may pass 2**31
    kv_head = tl.program_id(1) % num_kv_heads
    split = tl.program_id(2)
    kv_len = max_kv_tokens
    if HAS_KV_LENS:
        kv_len = tl.load(kv_lens_ptr + batch).to(tl.int32)

    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    tokens = rows // GROUP_SIZE
    heads = kv_head * GROUP_SIZE + rows % GROUP_SIZE
    row_mask = tokens < q_len
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    dim_mask = dims < head_dim
    row_limit = tl.minimum(kv_len, kv_len - q_len + causal_shift + tokens + 1)  # [BLOCK_M] exclusive
    last_token = tl.minimum(q_len - 1, (tl.program_id(0) * BLOCK_M + BLOCK_M - 1) // GROUP_SIZE)
    tile_limit = tl.minimum(kv_len, kv_len - q_len + causal_shift + last_token + 1)
    lo = split * split_tokens
    hi = tl.minimum(lo + split_tokens, tile_limit)

    q_ptrs = q_ptr + batch * q_batch_stride + heads[:, None] * q_head_stride + tokens[:, None] * q_token_stride
    q = tl.load(q_ptrs + dims[None, :] * q_dim_stride, mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
    if DOT_IN_FP32:
        q = q.to(tl.float32)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        col_mask = cols < hi
        if PAGED:
            if SLOTS:  # key j is slot table[b, j] = page * PAGE_TOKENS + offset: pages need not be full
                slot = tl.load(
                    page_table_ptr + batch * pt_batch_stride + cols * pt_page_stride, mask=col_mask, other=-1
                )
                col_mask = col_mask & (slot >= 0)
                slot = tl.maximum(slot, 0).to(tl.int64)
                page = slot // PAGE_TOKENS
                offset = slot % PAGE_TOKENS
            else:
                page = tl.load(
                    page_table_ptr + batch * pt_batch_stride + (cols // PAGE_TOKENS) * pt_page_stride,
                    mask=col_mask,
                    other=-1,
                )
                col_mask = col_mask & (page >= 0)
                page = tl.maximum(page, 0).to(tl.int64)
                offset = cols % PAGE_TOKENS
            k_cols = page * k_batch_stride + offset * k_token_stride
            v_cols = page * v_batch_stride + offset * v_token_stride
        else:
            k_cols = batch * k_batch_stride + cols * k_token_stride
            v_cols = batch * v_batch_stride + cols * v_token_stride
        kv_mask = col_mask[:, None] & dim_mask[None, :]
        k = tl.load(
            k_ptr + kv_head * k_head_stride + k_cols[:, None] + dims[None, :] * k_dim_stride,
            mask=kv_mask,
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        v = tl.load(
            v_ptr + kv_head * v_head_stride + v_cols[:, None] + dims[None, :] * v_dim_stride,
            mask=kv_mask,
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        if DOT_IN_FP32:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = col_mask[None, :] & (cols[None, :] < row_limit[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # A row with no visible key so far keeps m = -inf; shift by 0 instead, so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p = p.to(v.dtype)  # like flash attention: probabilities enter the second matmul in the KV dtype
        if DOT_IN_FP32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=INPUT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    out_ptrs = out_ptr + batch * out_batch_stride + heads[:, None] * out_head_stride
    out_ptrs += tokens[:, None] * out_token_stride + split * out_split_stride + dims[None, :] * out_dim_stride
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])
    if STORE_LSE:
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        lse_ptrs = lse_ptr + batch * lse_batch_stride + heads * lse_head_stride + tokens * lse_token_stride
        tl.store(lse_ptrs + split * lse_split_stride, lse, mask=row_mask)


@triton.jit
def attention_merge_kernel(
    part_ptr,  # [batch, num_q_heads, q_len, num_splits, head_dim] float32, contiguous
    lse_ptr,  # [batch, num_q_heads, q_len, num_splits] float32, contiguous
    out_ptr,
    num_rows,  # batch * num_q_heads * q_len
    num_q_heads, q_len, num_splits, head_dim,
    out_batch_stride, out_head_stride, out_token_stride, out_dim_stride,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # [BLOCK_R] (batch, head, token)
    splits = tl.arange(0, BLOCK_S)  # [BLOCK_S]
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    row_mask = rows < num_rows
    lse_mask = row_mask[:, None] & (splits < num_splits)[None, :]
    lse = tl.load(lse_ptr + rows[:, None] * num_splits + splits[None, :], mask=lse_mask, other=float("-inf"))
    lse_max = tl.max(lse, axis=1)
    weights = tl.math.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max)[:, None])  # [BLOCK_R, BLOCK_S]
    part_ptrs = part_ptr + ((rows[:, None] * num_splits + splits[None, :]) * head_dim)[:, :, None]
    part_mask = lse_mask[:, :, None] & (dims < head_dim)[None, None, :]
    part = tl.load(part_ptrs + dims[None, None, :], mask=part_mask, other=0.0)  # [BLOCK_R, BLOCK_S, BLOCK_D]
    total = tl.sum(weights, axis=1)
    out = tl.sum(weights[:, :, None] * part, axis=1) / tl.where(total > 0.0, total, 1.0)[:, None]
    batch = rows // (num_q_heads * q_len)
    head = (rows // q_len) % num_q_heads
    token = rows % q_len
    out_ptrs = out_ptr + batch * out_batch_stride + head * out_head_stride + token * out_token_stride
    out_mask = row_mask[:, None] & (dims < head_dim)[None, :]
    tl.store(out_ptrs[:, None] + dims[None, :] * out_dim_stride, out.to(out_ptr.dtype.element_ty), mask=out_mask)
