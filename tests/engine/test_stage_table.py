"""Staging every later layer from one address table computed from page numbers.

The slab-copy kernel reads absolute addresses, so a wrong one corrupts memory instead of failing. Off CUDA the
same rows are executed with ``memmove`` on real host memory, and the rows are compared with the addresses of
the tensor views the layer-by-layer path builds: the arithmetic is the same on a GPU.
"""

from __future__ import annotations

import pytest
import torch

import mosaic_core.memory.arena as arena
from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.engine.retrieval import Retriever
from mosaic_core.memory.arena import PagePools
from mosaic_core.memory.layout import KVSpec
from mosaic_core.memory.transfer import TransferEngine
from tests.engine.engine_helpers import feed, make_engine
from tests.engine.hidden_recorder import assert_same_hiddens, record_hiddens

SPEC = KVSpec(num_layers=3, num_kv_heads=2, num_q_heads=4, head_dim=8, dtype=torch.float32)
PAGE_TOKENS = 5


@pytest.fixture
def pools(monkeypatch):
    page_bytes = SPEC.bytes_per_token * PAGE_TOKENS
    monkeypatch.setattr(arena, "HOST_CHUNK_BYTES", 3 * page_bytes)  # several host chunks: no common base
    pools = PagePools(
        SPEC, page_tokens=PAGE_TOKENS, device=torch.device("cpu"), device_bytes=8 * page_bytes,
        host_bytes=10 * page_bytes, transfers=TransferEngine(torch.device("cpu")),
    )  # fmt: skip
    assert pools.take(Tier.HOST, 10) is not None and len(pools.host_chunks) == 4
    for chunk in pools.host_chunks:
        chunk.copy_(torch.randn_like(chunk))
    pools.device_pool.zero_()
    return pools


def test_addresses_are_the_slab_views(pools):
    for tier, pages in ((Tier.HOST, [9, 0, 4, 7]), (Tier.DEVICE, [5, 1])):
        for layer in range(SPEC.num_layers):
            views = [pools.layer_slab(tier, p, layer, PAGE_TOKENS).data_ptr() for p in pages]
            assert pools.slab_addresses(tier, pages, layer).tolist() == views


def test_staged_rows_copy_what_the_slab_views_copy(pools):
    src, fills, dst, layers = [9, 0, 4], [5, 2, 3], [6, 1, 3], range(1, 3)
    rows = pools.stage_rows(Tier.HOST, src, fills, dst, layers)
    pools.transfers.stage_layers(rows, pools.upload, SPEC.num_kv_heads, SPEC.head_dim, SPEC.dtype)
    for layer in range(SPEC.num_layers):
        for s, f, d in zip(src, fills, dst, strict=True):
            staged = pools.layer_slab(Tier.DEVICE, d, layer, PAGE_TOKENS)
            if layer in layers:
                assert torch.equal(staged[:, :, :f], pools.layer_slab(Tier.HOST, s, layer, f))
                assert not staged[:, :, f:].any()  # past the fill nothing is written
            else:
                assert not staged.any()


@pytest.mark.parametrize("groups", [[range(1, 3)], [range(0, 1), range(1, 3)], [range(0, 2), range(2, 3)]])
def test_block_rows_are_the_page_layer_runs(pools, groups):
    host_pages, device_pages = [4, 0, 9, 7], [2, 5, 1, 6]
    for runs, layers in zip(pools.group_rows(Tier.HOST, host_pages, device_pages, groups), groups, strict=True):
        for (src, dst, nbytes), h, d in zip(runs.tolist(), host_pages, device_pages, strict=True):
            first = pools.layer_slab(Tier.HOST, h, layers.start, pools.page_tokens)
            assert src == first.data_ptr()
            assert dst == pools.layer_slab(Tier.DEVICE, d, layers.start, pools.page_tokens).data_ptr()
            assert nbytes == len(layers) * first.numel() * first.element_size()


@pytest.mark.parametrize("staging_copy", ["kernel", "dma"])
def test_a_question_staged_from_one_table_computes_the_layer_by_layer_one(
    tiny_model, bikes_frames, monkeypatch, staging_copy
):
    """Cluster mode under a device budget that leaves most clusters on the host; two engines fed alike, since an
    answer promotes what it fetched. ``dma`` copies whole pages, layer groups at a time (on the CPU by memmove)."""
    engines = [make_engine(tiny_model, device_budget_bytes=1 << 20, staging_copy=c) for c in ("kernel", staging_copy)]
    for engine in engines:
        engine.open_stream("cam")
        feed(engine, "cam", bikes_frames[:40])
        assert any(c.tier == "host" for c in engine.clusters("cam"))
    question = "When did the cyclist pass the red car?"
    original, staged_at_once = Retriever.stage_shared, []

    def spying(self, chosen, layers, staging):
        moves = original(self, chosen, layers, staging)
        staged_at_once.append(moves is not None and self.num_copies > 0)
        return moves

    original_select = Retriever.select

    def by_views(self, layer, query):  # what every selection was before page numbers: a view of each slab
        selection = original_select(self, layer, query)
        selection.paged, selection.host_pages, selection.host_fills = False, [], []
        tiers = self.tiering.tiers
        for cluster_id in selection.cluster_ids:
            if tiers.tier_of(cluster_id) is not Tier.DEVICE:
                selection.slabs += tiers.layer_slabs(cluster_id, layer)
        return selection

    hiddens = record_hiddens(tiny_model, monkeypatch)
    monkeypatch.setattr(Retriever, "select", by_views)  # so stage_shared declines: the layer-by-layer path
    layer_by_layer = engines[0].answer("cam", question, max_new_tokens=6)
    expected = list(hiddens)
    monkeypatch.setattr(Retriever, "select", original_select)
    monkeypatch.setattr(Retriever, "stage_shared", spying)
    hiddens.clear()
    at_once = engines[1].answer("cam", question, max_new_tokens=6)
    assert staged_at_once == [True]
    assert_same_hiddens(hiddens, expected)
    if staging_copy == "kernel":  # dma counts every slot of the pages it copies
        assert at_once.retrieval.bytes_fetched == layer_by_layer.retrieval.bytes_fetched > 0
    assert at_once.retrieval.num_copies == layer_by_layer.retrieval.num_copies
    assert [s.cluster_id for s in at_once.evidence] == [s.cluster_id for s in layer_by_layer.evidence]
