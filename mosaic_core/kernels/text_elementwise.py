"""The language model's element-wise work on small passes (a question's prefill, a decode step), a kernel each.

transformers runs each op of a decoder layer's element-wise work as a kernel of its own. On a pass of a few rows
every such kernel costs its launch and a few microseconds on the device however little it computes: the bare
question forward on the H200 spent about 2.7 of its 7.3 ms of device time in some 750 of them (bench/NOTES.md,
session 12's profile). Here each piece is one kernel, with transformers' arithmetic:

    rms_norm        (residual + update, when given, rounded to the input dtype) -> float32 -> x * rsqrt(mean(x^2) + eps)
                    -> input dtype -> * weight                         Qwen2RMSNorm, and the layer's add before it
    silu_mul        silu(gate) rounded to its dtype, * up              Qwen2MLP's act_fn(gate_proj(x)) * up_proj(x)
    text_rotary     x * cos + rotate_half(x) * sin, each product and   apply_rotary_pos_emb on query or key
                    the sum rounded to x's dtype

Products and sums are computed in float32 from the inputs and rounded once to the tensor's dtype, as PyTorch's
half-precision ops do, and the kernels are built without FMA contraction, so a multiply-add rounds as the two eager
ops do. The norm's mean sums in another order than PyTorch's reduction, and ``tl.exp``/``rsqrt`` are not PyTorch's
``expf``/``rsqrtf``: those results may differ from eager in the last float32 bit, which a half-precision output
almost always rounds away (``tests/engine/test_text_elementwise.py``).

One program per row (per row and block of columns for ``silu_mul``): these are for passes of few rows. Big ingest
passes use the compiled functions of ``mosaic_core.model.text_fusion`` instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mosaic_core.errors import InvalidArgumentError
from mosaic_core.kernels import cdiv, check_float_dtype, check_kernel_device, launchable, next_power_of_2

_SILU_BLOCK = 1024  # columns per program of silu_mul


@triton.jit
def rms_norm_kernel(
    x_ptr, update_ptr, weight_ptr, sum_ptr, out_ptr,
    width, eps,
    x_row_stride, update_row_stride, sum_row_stride, out_row_stride,
    HAS_UPDATE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_UPDATE:
        update = tl.load(update_ptr + row * update_row_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + update.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * sum_row_stride + cols, x, mask=mask)
    hidden = x.to(tl.float32)
    variance = tl.sum(hidden * hidden, axis=0) / width
    normed = (hidden * tl.math.rsqrt(variance + eps)).to(x.dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = weight.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def silu_mul_kernel(
    gate_ptr, up_ptr, out_ptr,
    width,
    gate_row_stride, up_row_stride, out_row_stride,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0)
    up = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0)
    gate_32 = gate.to(tl.float32)
    silu = (gate_32 / (1.0 + tl.exp(-gate_32))).to(gate.dtype)
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def text_rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    x_row_stride, x_head_stride, cos_row_stride, sin_row_stride, out_row_stride, out_head_stride,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    dim_mask = dims < HALF
    mask = (heads < NUM_HEADS)[:, None] & dim_mask[None, :]
    cos_lo = tl.load(cos_ptr + row * cos_row_stride + dims, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
    cos_hi = tl.load(cos_ptr + row * cos_row_stride + HALF + dims, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
    sin_lo = tl.load(sin_ptr + row * sin_row_stride + dims, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
    sin_hi = tl.load(sin_ptr + row * sin_row_stride + HALF + dims, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
    x_ptrs = x_ptr + row * x_row_stride + heads[:, None] * x_head_stride + dims[None, :]
    x_lo = tl.load(x_ptrs, mask=mask, other=0.0)
    x_hi = tl.load(x_ptrs + HALF, mask=mask, other=0.0)
    dtype = x_lo.dtype
    lo, hi = x_lo.to(tl.float32), x_hi.to(tl.float32)
    # rotate_half(x) = cat(-x_hi, x_lo); each product rounded to x's dtype, then their sum.
    out_lo = (lo * cos_lo).to(dtype).to(tl.float32) + ((-hi) * sin_lo).to(dtype).to(tl.float32)
    out_hi = (hi * cos_hi).to(dtype).to(tl.float32) + (lo * sin_hi).to(dtype).to(tl.float32)
    out_ptrs = out_ptr + row * out_row_stride + heads[:, None] * out_head_stride + dims[None, :]
    tl.store(out_ptrs, out_lo.to(dtype), mask=mask)
    tl.store(out_ptrs + HALF, out_hi.to(dtype), mask=mask)


def _check_rows(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    """A ``[rows, width]`` operand whose last dim is contiguous."""
    if tensor.dim() != 2 or (tensor.shape[1] > 1 and tensor.stride(1) != 1):
        raise InvalidArgumentError(
            f"{name} must be [rows, width] with contiguous rows, got shape {tuple(tensor.shape)}"
        )
    check_float_dtype(name, tensor)
    check_kernel_device(name, tensor, device)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, update: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``Qwen2RMSNorm(weight, eps)`` of ``x`` ``[rows, width]``, or of ``x + update`` when ``update`` is given.

    Returns:
        ``(sum, normed)``: the sum ``x + update`` in ``x``'s dtype (None without ``update``), and the norm, in the
        dtype PyTorch gives ``weight * x``.

    Raises:
        InvalidArgumentError: On mismatched shapes, dtypes or devices.
    """
    _check_rows("x", x, x.device)
    rows, width = x.shape
    if tuple(weight.shape) != (width,):
        raise InvalidArgumentError(f"weight must be [{width}] for x {tuple(x.shape)}, got {tuple(weight.shape)}")
    check_float_dtype("weight", weight)
    check_kernel_device("weight", weight, x.device)
    if update is not None:
        _check_rows("update", update, x.device)
        if update.shape != x.shape or update.dtype != x.dtype:
            raise InvalidArgumentError(
                f"update must be {tuple(x.shape)} {x.dtype} like x, got {tuple(update.shape)} {update.dtype}"
            )
    weight = weight.contiguous()
    out = torch.empty((rows, width), dtype=torch.result_type(weight, x), device=x.device)
    total = torch.empty_like(x) if update is not None else None
    if rows == 0:
        return total, out
    block = next_power_of_2(width)
    launchable(rms_norm_kernel)[(rows,)](
        x, update if update is not None else x, weight, total if total is not None else out, out,
        width, eps,
        x.stride(0), update.stride(0) if update is not None else 0, total.stride(0) if total is not None else 0,
        out.stride(0),
        HAS_UPDATE=update is not None, BLOCK=block,
        num_warps=min(16, max(4, block // 512)),
        enable_fp_fusion=False,
    )  # fmt: skip
    return total, out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``[rows, width]`` operands of one dtype, as a new contiguous tensor.

    Raises:
        InvalidArgumentError: On mismatched shapes, dtypes or devices.
    """
    _check_rows("gate", gate, gate.device)
    _check_rows("up", up, gate.device)
    if up.shape != gate.shape or up.dtype != gate.dtype:
        raise InvalidArgumentError(
            f"up must be {tuple(gate.shape)} {gate.dtype} like gate, got {tuple(up.shape)} {up.dtype}"
        )
    rows, width = gate.shape
    out = torch.empty((rows, width), dtype=gate.dtype, device=gate.device)
    if rows == 0 or width == 0:
        return out
    launchable(silu_mul_kernel)[(rows, cdiv(width, _SILU_BLOCK))](
        gate, up, out, width, gate.stride(0), up.stride(0), out.stride(0),
        BLOCK=_SILU_BLOCK, num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def text_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary_pos_emb``'s arithmetic on one of query or key, ``[rows, heads, head_dim]`` with ``[rows,
    head_dim]`` cos and sin of its dtype; returns a new contiguous tensor of ``x``'s shape and dtype.

    Raises:
        InvalidArgumentError: On mismatched shapes, dtypes or devices, an odd head_dim, or a last dim of ``x``,
            ``cos`` or ``sin`` that is not contiguous.
    """
    if x.dim() != 3 or x.shape[-1] % 2 != 0 or x.stride(-1) != 1:
        raise InvalidArgumentError(
            f"x must be [rows, heads, head_dim] with an even, contiguous head_dim, got shape {tuple(x.shape)}"
        )
    check_float_dtype("x", x)
    check_kernel_device("x", x, x.device)
    rows, num_heads, head_dim = x.shape
    for name, angles in (("cos", cos), ("sin", sin)):
        if tuple(angles.shape) != (rows, head_dim) or angles.dtype != x.dtype or angles.stride(-1) != 1:
            raise InvalidArgumentError(
                f"{name} must be [rows, head_dim] = {(rows, head_dim)} {x.dtype} with contiguous rows, got "
                f"{tuple(angles.shape)} {angles.dtype}"
            )
        check_kernel_device(name, angles, x.device)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0 or num_heads == 0:
        return out
    half = head_dim // 2
    launchable(text_rotary_kernel)[(rows,)](
        x, cos, sin, out,
        x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, HALF=half, BLOCK_H=next_power_of_2(num_heads), BLOCK_HALF=next_power_of_2(half),
        num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return out
