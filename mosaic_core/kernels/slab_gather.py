"""Copy one layer of many pages into device pages (or one buffer) in a single launch.

Each page ``[num_layers, 2, num_kv_heads, page_tokens, head_dim]`` lives in the device pool or in one of the host
pool's chunks, so there is no common base pointer: the kernel takes a table of absolute addresses, one per page's
layer slab. A slab holds ``n_c`` tokens of a page of ``cap_c >= n_c`` token slots (a page need not be full).
Pinned host memory is read in place over PCIe (unified addressing: Triton's launcher and the driver map
``cudaHostAlloc`` memory into the device's address space), device-resident pages are read from HBM, both in
the same launch. That replaces one copy call per slab (about 5 us each) with one launch per layer.

    source c:       [2, H, src_cap_c, D] contiguous at one address; its first n_c tokens are read
    destination c:  [2, H, dst_cap_c, D] contiguous at another; its first n_c tokens are written
                    (``gather_slabs``: destinations are back-to-back token ranges of one [2, H, S, D] buffer;
                    ``copy_slabs``: pages of the device pool)

    grid = (num_slabs, 2 * H, cdiv(max n_c, BLOCK_T))
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import numpy as np
import torch
import triton
import triton.language as tl

from mosaic_core.errors import InvalidArgumentError
from mosaic_core.kernels import launchable, next_power_of_2

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def copy_slabs_kernel(
    table_ptr,  # [num_slabs, 5] int64: source address, destination address, tokens, source slots, destination slots
    ELEM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    slab = tl.program_id(0)
    head2 = tl.program_id(1)  # k/v index * H + head
    src_address = tl.load(table_ptr + slab * 5)
    dst_address = tl.load(table_ptr + slab * 5 + 1)
    length = tl.load(table_ptr + slab * 5 + 2)
    src_slots = tl.load(table_ptr + slab * 5 + 3)
    dst_slots = tl.load(table_ptr + slab * 5 + 4)
    first = tl.program_id(2) * BLOCK_T
    if first < length:
        src_ptr = src_address.to(tl.pointer_type(ELEM))
        dst_ptr = dst_address.to(tl.pointer_type(ELEM))
        tokens = first + tl.arange(0, BLOCK_T)  # [BLOCK_T]
        dims = tl.arange(0, HEAD_DIM)  # [HEAD_DIM]
        mask = (tokens < length)[:, None]
        tile = tl.load(src_ptr + (head2 * src_slots + tokens)[:, None] * HEAD_DIM + dims[None, :], mask=mask)
        tl.store(dst_ptr + (head2 * dst_slots + tokens)[:, None] * HEAD_DIM + dims[None, :], tile, mask=mask)


def gather_slabs(
    slabs: list[torch.Tensor],
    out: torch.Tensor,
    first_token: int,
    *,
    on_launch: Callable[[], None] | None = None,
    block_tokens: int = 256,
    num_warps: int = 4,
) -> int:
    """Copies ``slabs`` (each ``[2, H, n_c, D]``) into ``out[:, :, first_token:]`` back to back.

    Args:
        slabs: layer slabs of the chosen pages, on the device or in pinned host memory: each the first ``n_c``
            tokens of a contiguous ``[2, H, cap_c, D]`` (contiguous along tokens and head_dim).
        out: ``[2, H, S, D]`` on the device, contiguous.
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
    capacity = out.shape[2]
    if _page_capacity(out) != capacity:
        raise InvalidArgumentError(f"out {tuple(out.shape)} is strided")
    offsets, offset = [], first_token
    for slab in slabs:
        offsets.append(offset)
        offset += slab.shape[2]
    if offset > capacity:
        raise InvalidArgumentError(f"{offset} tokens do not fit out {tuple(out.shape)}")
    dsts = [out[:, :, o : o + slab.shape[2]] for o, slab in zip(offsets, slabs, strict=True)]
    copy_slabs(slabs, dsts, on_launch=on_launch, block_tokens=block_tokens, num_warps=num_warps)
    return offset


def copy_slabs(
    srcs: list[torch.Tensor],
    dsts: list[torch.Tensor],
    *,
    on_launch: Callable[[], None] | None = None,
    block_tokens: int = 256,
    num_warps: int = 4,
) -> None:
    """``dsts[i].copy_(srcs[i])`` for every ``i`` in one launch: page slabs ``[2, H, n_i, D]`` on the device or in
    pinned host memory into device page slabs (each the first tokens of a contiguous ``[2, H, cap, D]``)."""
    if not srcs:
        return
    if on_launch is not None:
        on_launch()
    device = dsts[0].device
    _, num_heads, _, head_dim = dsts[0].shape
    table, longest = slab_table_rows(srcs, dsts)
    if longest == 0:
        return
    host_table = torch.tensor(table, dtype=torch.int64)
    table_t = host_table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host_table
    copy_slab_table(table_t, longest, num_heads, head_dim, dsts[0].dtype, block_tokens, num_warps)


def slab_table_rows(srcs: list[torch.Tensor], dsts: list[torch.Tensor]) -> tuple[list[tuple[int, ...]], int]:
    """``copy_slabs``' address table, one row per slab pair after checking it, and the longest slab's tokens."""
    device = dsts[0].device
    _, num_heads, _, head_dim = dsts[0].shape
    table, longest = [], 0
    for src, dst in zip(srcs, dsts, strict=True):
        if src.shape != dst.shape or src.shape[0] != 2 or src.shape[1] != num_heads or src.shape[3] != head_dim:
            raise InvalidArgumentError(f"slab {tuple(src.shape)} does not match {tuple(dst.shape)}")
        src_slots, dst_slots = _page_capacity(src), _page_capacity(dst)
        if src_slots is None or dst_slots is None:
            raise InvalidArgumentError(f"slab {tuple(src.shape)} or its destination is strided")
        if src.dtype != dst.dtype or dst.device != device:
            raise InvalidArgumentError(f"slab dtype {src.dtype} differs from out dtype {dst.dtype}")
        if not (src.is_cuda or src.is_pinned() or device.type != "cuda"):
            raise InvalidArgumentError("a host slab must be pinned for the device to read it")
        table.append((src.data_ptr(), dst.data_ptr(), src.shape[2], src_slots, dst_slots))
        longest = max(longest, src.shape[2])
    return table, longest


def copy_slab_table(
    table: torch.Tensor,  # [num_slabs, 5] int64 on the device: the rows ``copy_slabs`` builds
    longest: int,
    num_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    block_tokens: int = 256,
    num_warps: int = 4,
) -> None:
    """One launch copying every slab of an address table already on the device (``copy_slabs`` builds one from
    tensors; ``PagePools.stage_rows`` from page numbers, for many layers at once)."""
    if table.shape[0] == 0 or longest == 0:
        return
    block_t = min(block_tokens, next_power_of_2(longest))
    grid = (table.shape[0], 2 * num_heads, triton.cdiv(longest, block_t))
    launchable(copy_slabs_kernel)[grid](
        table, ELEM=_TL_DTYPES[dtype], HEAD_DIM=head_dim, BLOCK_T=block_t, num_warps=num_warps,
    )  # fmt: skip


def copy_slab_table_reference(table: np.ndarray, num_heads: int, head_dim: int, element_size: int) -> None:
    """What ``copy_slab_table`` does, on host memory: for each row and each of the 2 x H (K or V, head) runs,
    ``tokens x head_dim`` elements from the source address to the destination address. Off CUDA both ends are
    host memory, so the rows are checked against real bytes (``tests/engine/test_stage_table.py``)."""
    run = head_dim * element_size
    for src, dst, tokens, src_slots, dst_slots in table.tolist():
        for head2 in range(2 * num_heads):
            ctypes.memmove(dst + head2 * dst_slots * run, src + head2 * src_slots * run, tokens * run)


def _page_capacity(slab: torch.Tensor) -> int | None:
    """Token slots of the contiguous ``[2, H, cap, D]`` block whose first tokens ``slab`` is, or None if it is
    not such a view."""
    _, num_heads, num_tokens, head_dim = slab.shape
    capacity, rest = divmod(slab.stride(0), num_heads * head_dim)
    ok = (
        rest == 0
        and capacity >= num_tokens
        and slab.stride(3) == 1
        and (slab.stride(2) == head_dim or num_tokens <= 1)
        and (slab.stride(1) == capacity * head_dim or num_heads == 1)
    )
    return capacity if ok else None


def gather_slabs_reference(slabs: list[torch.Tensor], out: torch.Tensor, first_token: int) -> int:
    """One ``copy_`` per slab: the slab-by-slab path the kernel replaces."""
    offset = first_token
    for slab in slabs:
        out[:, :, offset : offset + slab.shape[2]].copy_(slab, non_blocking=True)
        offset += slab.shape[2]
    return offset
