"""Gather one layer of many clusters into a question's KV buffer in a single launch.

Each cluster is its own tensor ``[num_layers, 2, num_kv_heads, n_c, head_dim]`` in whichever tier holds it, so
there is no common base pointer: the kernel takes a table of absolute addresses, one per chosen cluster's layer
slab. Pinned host memory is read in place over PCIe (unified addressing: Triton's launcher and the driver map
``cudaHostAlloc`` memory into the device's address space), device-resident clusters are read from HBM, both in
the same launch. That replaces one copy call per cluster (about 5 us each) with one launch per layer.

    slab c (layer l):  [2, H, n_c, D] contiguous at address table[c]
    out:               [2, H, S, D];  cluster c lands at tokens offsets[c] .. offsets[c] + n_c

    grid = (num_clusters, 2 * H, cdiv(max n_c, BLOCK_T))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from mosaic_core.errors import InvalidArgumentError
from mosaic_core.kernels import launchable, next_power_of_2

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def gather_slabs_kernel(
    table_ptr,  # [num_clusters, 3] int64: slab address, tokens, output offset
    out_ptr,
    num_heads2, out_kv_stride, out_token_stride,
    ELEM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    cluster = tl.program_id(0)
    head2 = tl.program_id(1)  # k/v index * H + head
    address = tl.load(table_ptr + cluster * 3)
    length = tl.load(table_ptr + cluster * 3 + 1)
    offset = tl.load(table_ptr + cluster * 3 + 2)
    first = tl.program_id(2) * BLOCK_T
    if first < length:
        src_ptr = address.to(tl.pointer_type(ELEM))
        tokens = first + tl.arange(0, BLOCK_T)  # [BLOCK_T]
        dims = tl.arange(0, HEAD_DIM)  # [HEAD_DIM]
        mask = (tokens < length)[:, None]
        src = src_ptr + (head2 * length + tokens)[:, None] * HEAD_DIM + dims[None, :]
        tile = tl.load(src, mask=mask)
        dst = out_ptr + head2 * out_kv_stride + (offset + tokens)[:, None] * out_token_stride + dims[None, :]
        tl.store(dst, tile, mask=mask)


def gather_slabs(
    slabs: list[torch.Tensor],
    out: torch.Tensor,
    first_token: int,
    *,
    on_launch: Callable[[], None] | None = None,
    block_tokens: int = 256,
    num_warps: int = 4,
) -> int:
    """Copies ``slabs`` (each ``[2, H, n_c, D]``, contiguous) into ``out[:, :, first_token:]`` back to back.

    Args:
        slabs: layer slabs of the chosen clusters, on the device or in pinned host memory.
        out: ``[2, H, S, D]`` on the device, contiguous along tokens and head_dim.
        first_token: where the first slab lands in ``out``.
        on_launch: called before the host builds the address table, so a caller timing the transfer with a
            device event counts the host's preparation too, exactly as it does for the per-slab copy path (where
            the host issues each copy inside the timed span).
        block_tokens, num_warps: tile of one program (tokens of one head's K or V) and its warps; the defaults
            are what ``bench/kernels_bench.py --only slabs`` found fastest (bench/NOTES.md).

    Returns:
        The token offset one past the last slab.
    """
    if not slabs:
        return first_token
    if on_launch is not None:
        on_launch()
    _, num_heads, capacity, head_dim = out.shape
    table, offset, longest = [], first_token, 0
    for slab in slabs:
        if slab.shape[0] != 2 or slab.shape[1] != num_heads or slab.shape[3] != head_dim or not slab.is_contiguous():
            raise InvalidArgumentError(f"slab {tuple(slab.shape)} does not match out {tuple(out.shape)} or is strided")
        if slab.dtype != out.dtype:
            raise InvalidArgumentError(f"slab dtype {slab.dtype} differs from out dtype {out.dtype}")
        if not (slab.is_cuda or slab.is_pinned() or not out.is_cuda):
            raise InvalidArgumentError("a host slab must be pinned for the device to read it")
        table.append((slab.data_ptr(), slab.shape[2], offset))
        offset += slab.shape[2]
        longest = max(longest, slab.shape[2])
    if offset > capacity or out.stride(3) != 1 or out.stride(0) != num_heads * out.stride(1):
        raise InvalidArgumentError(f"{offset} tokens do not fit out {tuple(out.shape)} (or out is strided)")
    host_table = torch.tensor(table, dtype=torch.int64)
    table_t = host_table.pin_memory().to(out.device, non_blocking=True) if out.is_cuda else host_table
    block_t = min(block_tokens, next_power_of_2(longest))
    grid = (len(slabs), 2 * num_heads, triton.cdiv(longest, block_t))
    launchable(gather_slabs_kernel)[grid](
        table_t, out, 2 * num_heads, out.stride(1), out.stride(2),
        ELEM=_TL_DTYPES[out.dtype], HEAD_DIM=head_dim, BLOCK_T=block_t, num_warps=num_warps,
    )  # fmt: skip
    return offset


def gather_slabs_reference(slabs: list[torch.Tensor], out: torch.Tensor, first_token: int) -> int:
    """One ``copy_`` per slab: the page-by-page path the kernel replaces."""
    offset = first_token
    for slab in slabs:
        out[:, :, offset : offset + slab.shape[2]].copy_(slab, non_blocking=True)
        offset += slab.shape[2]
    return offset
