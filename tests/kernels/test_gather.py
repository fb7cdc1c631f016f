"""gather_rows / gather_spans against the torch references; copies must be bit-exact."""

from __future__ import annotations

import pytest
import torch

import mosaic_core.kernels.gather as gather_module
from mosaic_core.errors import InvalidArgumentError
from mosaic_core.kernels import copy_spans_reference, gather_rows, gather_rows_reference, gather_spans

# KV rows are float16/bfloat16 in the engine; uint8 stands for byte views of a packed pool.
DTYPES = [torch.float32, torch.bfloat16, torch.uint8]
NUM_SRC_ROWS = 113


def _source(dtype: torch.dtype, row_elems: int, layout: str) -> torch.Tensor:
    """A [NUM_SRC_ROWS, row_elems] host pool of distinct values, contiguous or as a strided view."""
    gen = torch.Generator().manual_seed(99)
    if layout == "contiguous":
        full = torch.randn(NUM_SRC_ROWS, row_elems, generator=gen)
    elif layout == "row_slice":  # rows padded in memory: row stride > row_elems
        full = torch.randn(NUM_SRC_ROWS, row_elems + 5, generator=gen)[:, 2 : 2 + row_elems]
    else:  # transposed: element stride > 1
        full = torch.randn(row_elems, NUM_SRC_ROWS, generator=gen).t()
    if dtype == torch.uint8:
        return (full * 40).to(torch.int16).remainder(256).to(torch.uint8)
    return full.to(dtype)


def _poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _assert_rows_equal(out: torch.Tensor, expected: torch.Tensor) -> None:
    out, expected = out.cpu(), expected.cpu()
    if out.is_floating_point():
        assert not out.isnan().any(), "some output element was not written"
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row_elems", [97, 64])
@pytest.mark.parametrize("layout", ["contiguous", "row_slice", "transposed"])
def test_gather_rows_matches_reference(dtype, row_elems, layout, device):
    src = _source(dtype, row_elems, layout).to(device)
    # 17 ids in random order, with a repeat and both ends of the pool.
    row_ids = torch.tensor([5, 0, 112, 40, 40, 9, 77, 3, 101, 64, 18, 2, 90, 33, 111, 56, 1], device=device)
    expected = gather_rows_reference(src, row_ids)
    # Bytes have no NaN: run once per poison value, since an unwritten byte cannot equal both.
    for poison in [7, 201] if dtype == torch.uint8 else [float("nan")]:
        out = torch.full((17, row_elems), poison, dtype=dtype, device=device)

        result = gather_rows(src, row_ids, out)

        assert result is out
        _assert_rows_equal(out, expected)


SPAN_CASES = {
    "mixed": ([3, 50, 0, 96, 20], [17, 1, 0, 17, 30]),  # includes an empty span and the pool's last row
    "one_span": ([10], [97]),
    "single_rows": ([112, 0, 56], [1, 1, 1]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spans", SPAN_CASES.values(), ids=SPAN_CASES.keys())
@pytest.mark.parametrize("layout", ["contiguous", "row_slice"])
def test_gather_spans_matches_reference(dtype, spans, layout, device):
    src = _source(dtype, 97, layout).to(device)
    starts, lengths = spans
    out = _poisoned((sum(lengths), 97), dtype, device)

    result = gather_spans(src, torch.tensor(starts), torch.tensor(lengths), out)

    assert result is out
    _assert_rows_equal(out, copy_spans_reference(src, starts, lengths))


def test_small_tiles_split_rows_and_columns(device, monkeypatch):
    """256-byte tiles: one row per program, two column blocks per row, some blocks past a span's end."""
    monkeypatch.setattr(gather_module, "_TILE_BYTES", 256)
    src = _source(torch.float32, 97, "row_slice").to(device)
    row_ids = torch.tensor([5, 0, 112, 40, 40], device=device)
    starts, lengths = [3, 50, 110], [2, 0, 3]
    rows_out = _poisoned((5, 97), torch.float32, device)
    spans_out = _poisoned((5, 97), torch.float32, device)

    gather_rows(src, row_ids, rows_out)
    gather_spans(src, starts, lengths, spans_out)

    _assert_rows_equal(rows_out, gather_rows_reference(src, row_ids))
    _assert_rows_equal(spans_out, copy_spans_reference(src, starts, lengths))


def test_gather_spans_accepts_lists_and_allocates(device):
    src = _source(torch.float32, 64, "contiguous").to(device)
    out = gather_spans(src, [7, 60], [8, 16])
    assert out.shape == (24, 64) and out.device == src.device
    _assert_rows_equal(out, torch.cat([src[7:15], src[60:76]]))


def test_empty_requests_return_empty_outputs(device):
    src = _source(torch.float32, 64, "contiguous").to(device)
    assert gather_rows(src, torch.empty(0, dtype=torch.int64, device=device)).shape == (0, 64)
    assert gather_spans(src, [], []).shape == (0, 64)
    assert gather_spans(src, [4], [0]).shape == (0, 64)


def test_rejects_bad_requests(device):
    src = _source(torch.float32, 64, "contiguous").to(device)
    with pytest.raises(InvalidArgumentError, match=r"\[0, 113\]"):
        gather_rows(src, torch.tensor([0, NUM_SRC_ROWS], device=device))
    with pytest.raises(InvalidArgumentError, match="int64"):
        gather_rows(src, torch.tensor([0, 1], dtype=torch.int32, device=device))
    with pytest.raises(InvalidArgumentError, match=r"out must be \(2, 64\)"):
        gather_rows(src, torch.tensor([0, 1], device=device), torch.empty(3, 64, device=device))
    with pytest.raises(InvalidArgumentError, match=r"span 1 \(start 100, length 14\)"):
        gather_spans(src, [0, 100], [4, 14])
    with pytest.raises(InvalidArgumentError, match="equal-length"):
        gather_spans(src, [0, 1], [4])
    with pytest.raises(InvalidArgumentError, match=r"\(113, 2, 32\)"):
        gather_spans(src.view(NUM_SRC_ROWS, 2, 32), [0], [4])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: reads pinned host memory from the GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8], ids=str)
def test_reads_pinned_host_memory_directly(dtype):
    src = _source(dtype, 1024, "contiguous").pin_memory()
    row_ids = torch.tensor([9, 0, 112, 50, 50, 3], device="cuda")

    rows = gather_rows(src, row_ids)
    rows_from_host_ids = gather_rows(src, row_ids.cpu())  # pageable ids are staged through pinned memory
    spans = gather_spans(src, [100, 2], [13, 40])
    torch.cuda.synchronize()

    assert rows.is_cuda and rows_from_host_ids.is_cuda and spans.is_cuda
    _assert_rows_equal(rows, src[row_ids.cpu()])
    _assert_rows_equal(rows_from_host_ids, src[row_ids.cpu()])
    _assert_rows_equal(spans, torch.cat([src[100:113], src[2:42]]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rejects_pageable_host_source_on_gpu():
    src = _source(torch.float32, 64, "contiguous")
    with pytest.raises(InvalidArgumentError, match="pageable"):
        gather_rows(src, torch.tensor([0, 1], device="cuda"))
