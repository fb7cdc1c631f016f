"""The slab gather against its one-copy-per-slab reference, on awkward sizes and from mixed sources."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from mosaic_core.errors import InvalidArgumentError
from mosaic_core.kernels.slab_gather import gather_slabs, gather_slabs_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _slab(num_tokens: int, *, heads: int, dim: int, dtype, pinned: bool) -> torch.Tensor:
    layers = torch.randn(3, 2, heads, num_tokens, dim).to(dtype)
    if pinned and torch.cuda.is_available():
        layers = layers.pin_memory()
    return layers[1]  # one layer of a cluster: a contiguous slab inside a bigger tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("sizes", "heads", "dim"), [((17,), 2, 32), ((1, 97, 8, 16), 4, 64), ((5, 3), 1, 16)])
def test_gather_slabs_matches_one_copy_per_slab(dtype, sizes, heads, dim):
    slabs = [_slab(n, heads=heads, dim=dim, dtype=dtype, pinned=i % 2 == 0) for i, n in enumerate(sizes)]
    if DEVICE == "cuda":  # mix sources: every other slab already on the device
        slabs = [s if i % 2 == 0 else s.to(DEVICE) for i, s in enumerate(slabs)]
    capacity = 7 + sum(sizes) + 5
    out = torch.full((2, heads, capacity, dim), float("nan"), dtype=dtype, device=DEVICE)
    expected = out.clone()
    end = gather_slabs(slabs, out, 7)
    assert end == gather_slabs_reference([s.to(DEVICE) for s in slabs], expected, 7) == 7 + sum(sizes)
    assert torch.equal(out[:, :, 7:end].cpu(), expected[:, :, 7:end].cpu())  # a copy is exact
    assert torch.isnan(out[:, :, :7].float()).all() and torch.isnan(out[:, :, end:].float()).all()


def test_gather_slabs_rejects_what_does_not_fit():
    out = torch.zeros(2, 2, 8, 16, device=DEVICE)
    with pytest.raises(InvalidArgumentError, match="do not fit"):
        gather_slabs([torch.zeros(2, 2, 9, 16, device=DEVICE)], out, 0)
    with pytest.raises(InvalidArgumentError, match="does not match"):
        gather_slabs([torch.zeros(2, 3, 4, 16, device=DEVICE)], out, 0)
    with pytest.raises(InvalidArgumentError, match="dtype"):
        gather_slabs([torch.zeros(2, 2, 4, 16, dtype=torch.float16, device=DEVICE)], out, 0)
    if DEVICE == "cuda":
        with pytest.raises(InvalidArgumentError, match="pinned"):
            gather_slabs([torch.zeros(2, 2, 4, 16)], out, 0)


@pytest.mark.parametrize("page_tokens", [1, 8, 16])
def test_gather_slabs_reads_only_the_filled_tokens_of_partial_pages(page_tokens):
    heads, dim = 2, 32
    pool = torch.randn(5, 3, 2, heads, page_tokens, dim)  # [pages, layers, 2, H, page_tokens, D]
    if torch.cuda.is_available():
        pool = pool.pin_memory()
    fills = [page_tokens, max(1, page_tokens - 3), 1, page_tokens]
    slabs = [pool[p, 2, :, :, :fill] for p, fill in zip((4, 0, 2, 1), fills, strict=True)]
    out = torch.full((2, heads, 3 + sum(fills), dim), float("nan"), device=DEVICE)
    end = gather_slabs(slabs, out, 3)
    assert end == 3 + sum(fills)
    assert torch.equal(out[:, :, 3:].cpu(), torch.cat([s.cpu() for s in slabs], dim=2))


def test_gather_slabs_rejects_a_slab_strided_along_tokens():
    out = torch.zeros(2, 2, 8, 16, device=DEVICE)
    strided = torch.zeros(2, 2, 8, 16, device=DEVICE)[:, :, ::2]
    with pytest.raises(InvalidArgumentError, match="strided"):
        gather_slabs([strided], out, 0)


def test_copy_slabs_fills_scattered_pages_of_one_layer_and_leaves_the_rest():
    from mosaic_core.kernels.slab_gather import copy_slabs

    heads, dim, page_tokens = 2, 16, 8
    host = torch.randn(4, 3, 2, heads, page_tokens, dim)  # [pages, layers, 2, H, page_tokens, D]
    if torch.cuda.is_available():
        host = host.pin_memory()
    pool = torch.full((6, 3, 2, heads, page_tokens, dim), float("nan"), device=DEVICE)
    moves = [(3, 5, 8), (0, 1, 3), (2, 2, 1)]  # (host page, pool page, tokens)
    copy_slabs([host[s, 1, :, :, :n] for s, _, n in moves], [pool[d, 1, :, :, :n] for _, d, n in moves])
    for s, d, n in moves:
        assert torch.equal(pool[d, 1, :, :, :n].cpu(), host[s, 1, :, :, :n])
        assert torch.isnan(pool[d, 1, :, :, n:]).all() and torch.isnan(pool[d, 0]).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy engines need a GPU")
def test_copy_runs_move_pinned_host_runs_into_device_memory_on_the_copy_engines():
    from mosaic_core.memory import cudart

    assert cudart.available(), "PyTorch loaded no libcudart this module can find in /proc/self/maps"
    host = torch.randn(6, 1024, pin_memory=True)
    device = torch.zeros(6, 1024, device="cuda")
    stream = torch.cuda.Stream()
    runs = [(host[i].data_ptr(), device[j].data_ptr(), 2 * host[i].numel() * 4) for i, j in ((0, 3), (4, 0))]
    cudart.copy_runs(np.asarray(runs, dtype=np.int64), stream.cuda_stream)
    stream.synchronize()
    assert torch.equal(device[3:5].cpu(), host[0:2]) and torch.equal(device[0:2].cpu(), host[4:6])
    assert not device[2].any() and not device[5].any()


def _strided_case(device: str):
    """Host pages 2-4 (a group of 3 of each page's 8 values, from value 2) into device pages 5-7, as one strided run:
    the runs, the host pages and the device pages, every value of the latter not written left at -1."""
    host = torch.arange(10 * 8, dtype=torch.float32).reshape(10, 8)
    if device == "cuda":
        host = host.pin_memory()
    pages = torch.full((10, 8), -1.0, device=device)
    pitch, value = 8 * 4, 4
    runs = np.asarray([(host[2, 2].data_ptr(), pages[5, 2].data_ptr(), 3 * value, 3, pitch)], dtype=np.int64)
    return runs, host, pages


def _check_strided(host: torch.Tensor, pages: torch.Tensor) -> None:
    pages = pages.cpu()
    assert torch.equal(pages[5:8, 2:5], host[2:5, 2:5])
    written = torch.zeros(10, 8, dtype=torch.bool)
    written[5:8, 2:5] = True
    assert (pages[~written] == -1).all()


def test_a_strided_run_copies_one_group_of_consecutive_pages_and_nothing_else():
    from mosaic_core.memory import cudart

    runs, host, pages = _strided_case("cpu")
    cudart.copy_strided_reference(runs)
    _check_strided(host, pages)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy engines need a GPU")
def test_a_strided_run_moves_pinned_host_pages_on_the_copy_engines():
    from mosaic_core.memory import cudart

    runs, host, pages = _strided_case("cuda")
    stream = torch.cuda.Stream()
    cudart.copy_strided(runs, stream.cuda_stream)
    stream.synchronize()
    _check_strided(host, pages)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy engines need a GPU")
@pytest.mark.parametrize("prefer_overlap", [False, True])
def test_one_batched_call_lands_every_run_where_one_call_a_run_does(prefer_overlap):
    from mosaic_core.memory import cudart

    if not cudart.batch_available():
        pytest.skip(f"CUDA runtime {cudart.runtime_version()} has no cudaMemcpyBatchAsync")
    host = torch.randn(64, 4096, pin_memory=True)
    by_batch, by_run = torch.zeros(64, 4096, device="cuda"), torch.zeros(64, 4096, device="cuda")
    order = np.random.default_rng(2).permutation(64)[:48]  # 16 rows stay untouched
    stream = torch.cuda.Stream()
    for device, copy in ((by_batch, partial(cudart.copy_batch, prefer_overlap=prefer_overlap)),
                         (by_run, cudart.copy_runs)):  # fmt: skip
        runs = np.asarray([(host[i].data_ptr(), device[j].data_ptr(), 4096 * 4) for i, j in enumerate(order)])
        copy(runs, stream.cuda_stream)
    stream.synchronize()
    assert torch.equal(by_batch, by_run)
    assert torch.equal(by_batch[order].cpu(), host[: len(order)])
    assert not by_batch[np.setdiff1d(np.arange(64), order)].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy engines need a GPU")
@pytest.mark.parametrize("streams", [1, 3])
@pytest.mark.parametrize("batch", [False, True], ids=["a-call-a-run", "batched"])
def test_runs_dealt_to_several_streams_have_landed_when_their_move_passes(streams, batch):
    from mosaic_core.memory.transfer import TransferEngine

    engine = TransferEngine(torch.device("cuda"))
    host = torch.randn(64, 4096, pin_memory=True)
    device = torch.zeros(64, 4096, device="cuda")
    order = np.random.default_rng(1).permutation(64)
    runs = np.asarray([(host[i].data_ptr(), device[j].data_ptr(), 4096 * 4) for i, j in enumerate(order)])
    groups = [runs[:40], runs[40:]]
    moves = engine.copy_runs(groups, streams=streams, batch=batch)
    seen = []
    for moved in moves:  # the compute stream reads each group right after waiting for its move, on the device
        engine.wait(moved)
        seen.append(device.clone())
    torch.cuda.synchronize()
    expected = host[np.argsort(order)]  # exact copies: compared bit for bit (sums differed by reduction order)
    landed_first = torch.zeros(64, dtype=torch.bool)
    landed_first[order[:40]] = True
    assert torch.equal(seen[0].cpu()[landed_first], expected[landed_first])
    assert torch.equal(seen[1].cpu(), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy engines need a GPU")
def test_a_chain_of_copies_is_timed_with_and_without_the_host_preparation_before_it():
    """The first move of a chain is timed from a mark taken before the host prepared it; its copies alone start
    later, once the host issued them, so they take no longer, and every move's copies take some time."""
    import time

    from mosaic_core.memory.transfer import TransferEngine

    engine = TransferEngine(torch.device("cuda"))
    host = torch.randn(64, 1 << 16, pin_memory=True)
    device = torch.zeros(64, 1 << 16, device="cuda")
    runs = np.asarray([(host[i].data_ptr(), device[i].data_ptr(), (1 << 16) * 4) for i in range(64)])
    marked = engine.mark()
    time.sleep(0.05)  # the host's preparation, as long as it takes
    moves = engine.copy_runs([runs[:32], runs[32:]], started=marked)
    first, second = moves
    assert first.seconds() >= 0.05 > first.copy_seconds() > 0
    assert 0 < second.copy_seconds() <= second.seconds() + 1e-6
