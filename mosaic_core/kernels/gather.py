"""Gather kernels: move scattered KV rows, or whole clusters (spans of rows), into one packed tensor.

On a GPU the source is normally the pinned host pool, and the kernel reads host memory directly over PCIe
(zero-copy through unified virtual addressing). torch pins memory with ``cudaHostAlloc``, which on every
64-bit CUDA platform maps the block into the device's address space. Triton's launcher translates each
pointer argument with ``cuPointerGetAttribute(CU_POINTER_ATTRIBUTE_DEVICE_POINTER)``: that returns the device
alias of pinned host memory and fails only for pageable memory ("cpu tensor?"). So a pinned CPU tensor is
passed to the kernel as it is, with no device-pointer wrapper (``torch.cuda.cudart()`` binds no
``cudaHostGetDevicePointer`` anyway). The wrappers reject pageable sources with a clear error instead.

One program copies a tile of ``BLOCK_R`` rows x ``BLOCK_E`` elements:

    gather_rows:   out[i]               = src[row_ids[i]]
    gather_spans:  out[offset_s + r]    = src[start_s + r]        for r < length_s, offset_s = sum(length_<s)
                   grid = (num_spans, cdiv(max_length, BLOCK_R), cdiv(row_elems, BLOCK_E))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from mosaic_core.errors import InvalidArgumentError
from mosaic_core.kernels import (
    cdiv,
    check_index_dtype,
    check_out,
    check_rank,
    interpret_mode,
    launchable,
    next_power_of_2,
)

# Bytes one program moves per tile: big enough to keep many PCIe reads in flight, small enough for registers.
_TILE_BYTES = 16 * 1024
_MAX_GRID_Y = 65535


@triton.jit
def gather_rows_kernel(
    src_ptr, row_ids_ptr, out_ptr,
    num_ids, row_elems,
    src_row_stride, src_elem_stride, out_row_stride, out_elem_stride,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    elems = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)  # [BLOCK_E]
    row_mask = rows < num_ids
    mask = row_mask[:, None] & (elems < row_elems)[None, :]
    src_rows = tl.load(row_ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    src_ptrs = src_ptr + src_rows[:, None] * src_row_stride + elems[None, :] * src_elem_stride
    tile = tl.load(src_ptrs, mask=mask)
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * out_row_stride + elems[None, :] * out_elem_stride
    tl.store(out_ptrs, tile, mask=mask)


@triton.jit
def gather_spans_kernel(
    src_ptr,
    span_table_ptr,  # [num_spans, 3] int64: start row, length, output offset
    out_ptr,
    row_elems,
    src_row_stride, src_elem_stride, out_row_stride, out_elem_stride,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    span = tl.program_id(0)
    start = tl.load(span_table_ptr + span * 3)
    length = tl.load(span_table_ptr + span * 3 + 1)
    offset = tl.load(span_table_ptr + span * 3 + 2)
    first = tl.program_id(1) * BLOCK_R
    if first < length:
        rows = first + tl.arange(0, BLOCK_R)  # [BLOCK_R] within the span
        elems = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)  # [BLOCK_E]
        mask = (rows < length)[:, None] & (elems < row_elems)[None, :]
        src_ptrs = src_ptr + (start + rows)[:, None] * src_row_stride + elems[None, :] * src_elem_stride
        tile = tl.load(src_ptrs, mask=mask)
        out_ptrs = out_ptr + (offset + rows)[:, None] * out_row_stride + elems[None, :] * out_elem_stride
        tl.store(out_ptrs, tile, mask=mask)


def _target_device(src: torch.Tensor, out: torch.Tensor | None, device: torch.device | str | None) -> torch.device:
    if out is not None:
        return out.device
    if device is not None:
        return torch.device(device)
    if src.is_cuda or interpret_mode():
        return src.device
    return torch.device("cuda", torch.cuda.current_device())


def _check_source(src: torch.Tensor, device: torch.device) -> None:
    check_rank("src", src, 2, "[num_rows, row_elems]")
    if interpret_mode():
        return
    if device.type != "cuda":
        raise InvalidArgumentError(f"the gather output must be on a CUDA device, got {device}")
    if src.is_cuda:
        if src.device != device:
            raise InvalidArgumentError(f"src is on {src.device}, but the output is on {device}")
    elif not src.is_pinned():
        raise InvalidArgumentError(
            f"src {tuple(src.shape)} is pageable host memory: the kernel reads host memory only when it is "
            "pinned (src.pin_memory(), or allocate the pool with pin_memory=True)"
        )


def _tile_shape(row_elems: int, elem_bytes: int, num_rows_hint: int) -> tuple[int, int]:
    block_e = min(next_power_of_2(max(row_elems, 1)), max(16, _TILE_BYTES // elem_bytes))
    block_r = max(1, _TILE_BYTES // (block_e * elem_bytes))
    block_r = min(next_power_of_2(block_r), next_power_of_2(max(num_rows_hint, 1)))
    return block_r, block_e


def _upload(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Moves small index metadata to the kernel's device without stalling the stream.

    A copy from pageable memory waits for all work queued on the stream; staging through pinned memory
    keeps the copy asynchronous (the pinned allocator holds the block until the copy is done).
    """
    if index.device == device:
        return index
    if device.type == "cuda" and index.device.type == "cpu" and not index.is_pinned():
        index = index.pin_memory()
    return index.to(device, non_blocking=True)


def _make_out(src: torch.Tensor, num_out_rows: int, out: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    shape = (num_out_rows, src.shape[1])
    if out is None:
        return torch.empty(shape, dtype=src.dtype, device=device)
    check_out(out, shape, src.dtype, device)
    return out


def gather_rows(
    src: torch.Tensor,  # [num_rows, row_elems]
    row_ids: torch.Tensor,  # [n] int64
    out: torch.Tensor | None = None,  # [n, row_elems]
    *,
    device: torch.device | str | None = None,
    validate: bool = True,
) -> torch.Tensor:  # [n, row_elems]
    """Copies ``src[row_ids]`` into ``out`` with one kernel launch.

    Args:
        src: Source rows; a CUDA tensor, or pinned host memory read directly by the GPU. Any strides.
        row_ids: Rows to copy, int64; moved to the output's device if it is elsewhere.
        out: Where to write; allocated on ``device`` when omitted.
        device: Output device when ``out`` is omitted (default: ``src``'s CUDA device, else the current one).
        validate: Check that every id is in range; this synchronizes with the device.

    Returns:
        ``out``, holding ``src[row_ids[i]]`` in row ``i``.

    Raises:
        InvalidArgumentError: On bad shapes, dtypes, devices, pageable host sources or out-of-range ids.
    """
    target = _target_device(src, out, device)
    _check_source(src, target)
    check_rank("row_ids", row_ids, 1, "[n]")
    if row_ids.dtype != torch.int64:
        raise InvalidArgumentError(f"row_ids must be int64, got {row_ids.dtype}")
    out = _make_out(src, row_ids.shape[0], out, target)
    num_ids, row_elems = out.shape
    if num_ids == 0 or row_elems == 0:
        return out
    if validate:
        low, high = int(row_ids.min()), int(row_ids.max())
        if low < 0 or high >= src.shape[0]:
            raise InvalidArgumentError(f"row_ids span [{low}, {high}], outside src {tuple(src.shape)}")
    row_ids = _upload(row_ids, target)
    block_r, block_e = _tile_shape(row_elems, src.element_size(), num_ids)
    grid = (cdiv(num_ids, block_r), cdiv(row_elems, block_e))
    launchable(gather_rows_kernel)[grid](
        src, row_ids, out, num_ids, row_elems, *src.stride(), *out.stride(), BLOCK_R=block_r, BLOCK_E=block_e
    )
    return out


def _host_ints(values: torch.Tensor | Sequence[int]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy().astype(np.int64, copy=False)
    return np.asarray(values, dtype=np.int64)  # far cheaper than torch.as_tensor on a list of ints


def _span_table(
    span_starts: torch.Tensor | Sequence[int], span_lengths: torch.Tensor | Sequence[int], num_src_rows: int
) -> tuple[torch.Tensor, int, int]:  # [num_spans, 3] int64 host table (start, length, offset), total, max
    starts, lengths = _host_ints(span_starts), _host_ints(span_lengths)
    if starts.ndim != 1 or starts.shape != lengths.shape:
        raise InvalidArgumentError(
            f"span_starts {starts.shape} and span_lengths {lengths.shape} must be equal-length 1-D"
        )
    bad = (lengths < 0) | (starts < 0) | (starts + lengths > num_src_rows)
    if bad.any():
        first = int(bad.argmax())
        raise InvalidArgumentError(
            f"span {first} (start {starts[first]}, length {lengths[first]}) is outside src of {num_src_rows} rows"
        )
    table = np.empty((len(starts), 3), dtype=np.int64)
    table[:, 0], table[:, 1] = starts, lengths
    np.cumsum(lengths, out=table[:, 2])
    total = int(table[-1, 2]) if len(table) else 0
    table[:, 2] -= lengths  # exclusive prefix sum: where each span starts in the output
    return torch.from_numpy(table), total, int(lengths.max()) if len(table) else 0


def gather_spans(
    src: torch.Tensor,  # [num_rows, row_elems]
    span_starts: torch.Tensor | Sequence[int],  # [num_spans]
    span_lengths: torch.Tensor | Sequence[int],  # [num_spans]
    out: torch.Tensor | None = None,  # [sum(span_lengths), row_elems]
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:  # [sum(span_lengths), row_elems]
    """Packs whole spans of rows (clusters) into ``out`` back to back, with one kernel launch.

    The span list is host metadata (it sizes the output and the grid); device tensors are read back, which
    synchronizes.

    Args:
        src: Source rows; a CUDA tensor, or pinned host memory read directly by the GPU. Any strides.
        span_starts: First source row of each span.
        span_lengths: Rows in each span (0 is allowed).
        out: Where to write; allocated on ``device`` when omitted.
        device: Output device when ``out`` is omitted (default: ``src``'s CUDA device, else the current one).

    Returns:
        ``out``: span ``s`` occupies rows ``[sum(span_lengths[:s]), sum(span_lengths[:s+1]))``.

    Raises:
        InvalidArgumentError: On bad shapes, dtypes, devices, pageable host sources or spans outside ``src``.
    """
    target = _target_device(src, out, device)
    _check_source(src, target)
    for name, spans in (("span_starts", span_starts), ("span_lengths", span_lengths)):
        if isinstance(spans, torch.Tensor):
            check_index_dtype(name, spans)
    table, num_out_rows, max_length = _span_table(span_starts, span_lengths, src.shape[0])
    out = _make_out(src, num_out_rows, out, target)
    row_elems = out.shape[1]
    if num_out_rows == 0 or row_elems == 0:
        return out
    block_r, block_e = _tile_shape(row_elems, src.element_size(), max_length)
    block_r = max(block_r, next_power_of_2(cdiv(max_length, _MAX_GRID_Y)))
    table = _upload(table, target)
    grid = (table.shape[0], cdiv(max_length, block_r), cdiv(row_elems, block_e))
    launchable(gather_spans_kernel)[grid](
        src, table, out, row_elems, *src.stride(), *out.stride(), BLOCK_R=block_r, BLOCK_E=block_e
    )
    return out
