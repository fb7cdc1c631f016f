"""The staging sweep's strided copies (``bench.copy_runs_sweep --consecutive``) move the same bytes as its copies of
one page each: checked on host pools, where both are ``memmove``s, so the GPU run compares like with like."""

from __future__ import annotations

import numpy as np
import torch

from bench.copy_runs_sweep import _consecutive_pages, _strided_rows
from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.memory import arena, cudart
from mosaic_core.memory.arena import PagePools
from mosaic_core.memory.layout import KVSpec
from mosaic_core.memory.transfer import TransferEngine

SPEC = KVSpec(num_layers=6, num_kv_heads=2, num_q_heads=4, head_dim=8, dtype=torch.float32)


def _pools(page_tokens: int, host_pages: int) -> PagePools:
    page_bytes = SPEC.bytes_per_token * page_tokens
    return PagePools(
        SPEC, page_tokens=page_tokens, device=torch.device("cpu"), device_bytes=64 * page_bytes,
        host_bytes=host_pages * page_bytes, transfers=TransferEngine(torch.device("cpu")),
    )  # fmt: skip


def test_strided_runs_of_consecutive_pages_land_what_one_copy_a_page_lands(monkeypatch):
    page_tokens = 4
    monkeypatch.setattr(arena, "HOST_CHUNK_BYTES", 8 * SPEC.bytes_per_token * page_tokens)  # runs must not cross one
    runs_by_page, runs_strided = _pools(page_tokens, 32), _pools(page_tokens, 32)
    for pools in (runs_by_page, runs_strided):
        assert pools.host_chunk_pages == 8
        pools.device_pool.zero_()
        pages = pools.take(Tier.HOST, 32)
        for page in pages:
            pools.host_chunks[page // 8][page % 8].copy_(torch.full(pools.host_chunks[0][0].shape, float(page)))
    rng = np.random.default_rng(3)
    src = _consecutive_pages(runs_by_page, 32, 12, 4, rng)
    assert all(src[i + 1] == src[i] + 1 for i in range(0, 12, 4) for i in range(i, i + 3))
    assert all(src[i] // 8 == src[i + 3] // 8 for i in range(0, 12, 4))  # each run inside one chunk
    layers = range(2, 5)
    dst_by_page, dst_strided = runs_by_page.take(Tier.DEVICE, 12), runs_strided.take(Tier.DEVICE, 12)
    cudart.copy_runs_reference(runs_by_page.block_rows(Tier.HOST, src, dst_by_page, layers))
    cudart.copy_strided_reference(_strided_rows(runs_strided, src[::4], dst_strided[::4], 4, layers))
    by_page = runs_by_page.device_pool[dst_by_page]
    strided = runs_strided.device_pool[dst_strided]
    assert torch.equal(by_page, strided)
    assert (
        strided[:, layers.start : layers.stop]
        == torch.tensor(src, dtype=torch.float32)[:, None, None, None, None, None]
    ).all()
    assert not strided[:, : layers.start].any() and not strided[:, layers.stop :].any()
