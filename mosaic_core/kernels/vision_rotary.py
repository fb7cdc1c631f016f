"""The vision tower's rotary embedding on query and key at once, read in place from the qkv projection.

Same float32 arithmetic as transformers' ``apply_rotary_pos_emb_vision`` (its plain-torch twin is
``mosaic_core.model.vision_attention._rotate``), on ``x`` = query or key, ``h = head_dim / 2``:

    out[..., :h] = x[..., :h] * cos[:, :h] + (-x[..., h:]) * sin[:, :h]      # rotate_half(x) = cat(-x_hi, x_lo)
    out[..., h:] = x[..., h:] * cos[:, h:] +   x[..., :h]  * sin[:, h:]

in float32, each product and sum rounded on its own (the kernel is built with ``enable_fp_fusion=False``, so no
multiply-add is contracted into an FMA), then cast back to the input dtype.

The input is ``qkv[:2]`` of the attention's ``qkv.reshape(seq, 3, heads, head_dim).permute(1, 0, 2, 3)``: a
strided view whose row ``r`` holds query then key, ``heads * head_dim`` values each, next to each other.

Grid: one program per ``BLOCK_R`` rows, for every head of both query and key. Its tile is
``[BLOCK_R, BLOCK_H, BLOCK_HALF]`` (rows x heads x half a head), loaded twice per part (low half, high half):

    row r:  | q h0: lo hi | q h1: lo hi | ... | k h0: lo hi | ... |      lo, hi: h values each, h <= BLOCK_HALF
    cos, sin: loaded once per program as [BLOCK_R, BLOCK_HALF] (low and high half), shared by all heads and q/k

Offsets are a 64-bit row base plus 32-bit head and dim offsets; no per-element division.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mosaic_core.errors import InvalidArgumentError
from mosaic_core.kernels import (
    cdiv,
    check_float_dtype,
    check_kernel_device,
    check_rank,
    launchable,
    next_power_of_2,
)

# Elements of one [BLOCK_R, BLOCK_H, BLOCK_HALF] tile: 16 per thread at 4 warps, so the two halves in float32
# and the four cos/sin rows fit in registers. 7B shape (16 heads, half 40 -> 64): 2 rows per program.
_TILE_ELEMENTS = 2048


@triton.jit
def vision_rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    seq_len,
    x_part_stride, x_row_stride, x_head_stride, x_dim_stride,
    cos_row_stride, cos_dim_stride, sin_row_stride, sin_dim_stride,
    out_part_stride, out_row_stride, out_head_stride,  # the output's dim stride is 1
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    heads = tl.arange(0, BLOCK_H)  # [BLOCK_H]
    dims = tl.arange(0, BLOCK_HALF)  # [BLOCK_HALF], masked to HALF
    row_mask = rows < seq_len
    dim_mask = dims < HALF
    rows = rows.to(tl.int64)  # row * row stride may pass 2**31 on a big batch

    angle_mask = row_mask[:, None] & dim_mask[None, :]  # [BLOCK_R, BLOCK_HALF]
    cos_ptrs = cos_ptr + rows[:, None] * cos_row_stride + dims[None, :] * cos_dim_stride
    sin_ptrs = sin_ptr + rows[:, None] * sin_row_stride + dims[None, :] * sin_dim_stride
    cos_lo = tl.load(cos_ptrs, mask=angle_mask, other=0.0).to(tl.float32)[:, None, :]  # [BLOCK_R, 1, BLOCK_HALF]
    cos_hi = tl.load(cos_ptrs + HALF * cos_dim_stride, mask=angle_mask, other=0.0).to(tl.float32)[:, None, :]
    sin_lo = tl.load(sin_ptrs, mask=angle_mask, other=0.0).to(tl.float32)[:, None, :]
    sin_hi = tl.load(sin_ptrs + HALF * sin_dim_stride, mask=angle_mask, other=0.0).to(tl.float32)[:, None, :]

    mask = angle_mask[:, None, :] & (heads < NUM_HEADS)[None, :, None]  # [BLOCK_R, BLOCK_H, BLOCK_HALF]
    x_offsets = heads[None, :, None] * x_head_stride + dims[None, None, :] * x_dim_stride
    x_rows = x_ptr + rows[:, None, None] * x_row_stride
    out_offsets = heads[None, :, None] * out_head_stride + dims[None, None, :]
    out_rows = out_ptr + rows[:, None, None] * out_row_stride
    for part in tl.static_range(2):  # query, then key
        x_lo_ptrs = x_rows + part * x_part_stride + x_offsets
        x_lo = tl.load(x_lo_ptrs, mask=mask, other=0.0).to(tl.float32)
        x_hi = tl.load(x_lo_ptrs + HALF * x_dim_stride, mask=mask, other=0.0).to(tl.float32)
        out_lo = x_lo * cos_lo + (-x_hi) * sin_lo
        out_hi = x_hi * cos_hi + x_lo * sin_hi
        out_lo_ptrs = out_rows + part * out_part_stride + out_offsets
        tl.store(out_lo_ptrs, out_lo.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_lo_ptrs + HALF, out_hi.to(out_ptr.dtype.element_ty), mask=mask)


def _check_rotary_args(query_key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    check_rank("query_key", query_key, 4, "[2, seq, heads, head_dim]")
    check_rank("cos", cos, 2, "[seq, head_dim]")
    check_rank("sin", sin, 2, "[seq, head_dim]")
    parts, seq_len, _, head_dim = query_key.shape
    if parts != 2:
        raise InvalidArgumentError(f"query_key must stack query and key on dim 0, got shape {tuple(query_key.shape)}")
    if head_dim % 2 != 0:
        raise InvalidArgumentError(f"head_dim must be even to rotate halves, got shape {tuple(query_key.shape)}")
    for name, tensor in (("query_key", query_key), ("cos", cos), ("sin", sin)):
        check_float_dtype(name, tensor)
        check_kernel_device(name, tensor, query_key.device)
    for name, tensor in (("cos", cos), ("sin", sin)):
        if tuple(tensor.shape) != (seq_len, head_dim):
            raise InvalidArgumentError(
                f"{name} must be [seq, head_dim] = {(seq_len, head_dim)} for query_key "
                f"{tuple(query_key.shape)}, got {tuple(tensor.shape)}"
            )


def vision_rotary(
    query_key: torch.Tensor,  # [2, seq, heads, head_dim], any strides
    cos: torch.Tensor,  # [seq, head_dim]
    sin: torch.Tensor,  # [seq, head_dim]
    *,
    block_rows: int | None = None,
) -> torch.Tensor:  # [2, seq, heads, head_dim], contiguous, query_key's dtype
    """Applies the vision rotary embedding to stacked query and key in one launch.

    Args:
        query_key: Query and key stacked on dim 0, float16/bfloat16/float32; read in place through its strides
            (the attention passes ``qkv[:2]``, a view of the qkv projection's output).
        cos: Cosines per token and dim; converted to float32 in the kernel, like ``cos.float()``.
        sin: Sines per token and dim, likewise.
        block_rows: Rows per program (a power of two); by default as many as fill a tile of about 2,048
            elements.

    Returns:
        A new contiguous tensor of ``query_key``'s shape and dtype: ``apply_rotary_pos_emb_vision``'s result for
        query (index 0) and key (index 1).

    Raises:
        InvalidArgumentError: On mismatched shapes, dtypes or devices, or an odd head_dim.
    """
    _check_rotary_args(query_key, cos, sin)
    _, seq_len, num_heads, head_dim = query_key.shape
    out = torch.empty(query_key.shape, dtype=query_key.dtype, device=query_key.device)
    if seq_len == 0 or num_heads == 0:
        return out
    half = head_dim // 2
    block_h, block_half = next_power_of_2(num_heads), next_power_of_2(half)
    if block_rows is None:
        block_rows = max(1, _TILE_ELEMENTS // (block_h * block_half))
    elif block_rows < 1 or block_rows & (block_rows - 1):
        raise InvalidArgumentError(f"block_rows must be a power of two, got {block_rows}")
    launchable(vision_rotary_kernel)[(cdiv(seq_len, block_rows),)](
        query_key, cos, sin, out,
        seq_len,
        *query_key.stride(),
        *cos.stride(),
        *sin.stride(),
        *out.stride()[:3],
        NUM_HEADS=num_heads, HALF=half,
        BLOCK_R=block_rows, BLOCK_H=block_h, BLOCK_HALF=block_half,
        num_warps=4,
        enable_fp_fusion=False,  # separate float32 multiply and add, rounded as in transformers' eager ops
    )  # fmt: skip
    return out
