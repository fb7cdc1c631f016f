"""Slot tables are built once and reused only while they are right: the per-cluster slot cache, the table a
full-mode question shares across layers, and the non-blocking upload of index data."""

from __future__ import annotations

import numpy as np
import torch

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.engine.tiering import TierManager
from mosaic_core.memory.layout import KVSpec
from mosaic_core.memory.tiers import KVTiers
from tests.engine.engine_helpers import feed, make_engine
from tests.unit.tiering_helpers import make_tiering, move, put

SPEC = KVSpec(num_layers=3, num_kv_heads=2, num_q_heads=4, head_dim=16, dtype=torch.float32)


def _kv(num_tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, num_tokens, SPEC.head_dim, generator=generator)


def _tiering(tmp_path) -> TierManager:
    return make_tiering(SPEC, tmp_path, device="cpu", page_tokens=4)


def _expected_slots(tiers: KVTiers, cluster_id: str) -> np.ndarray:
    record = tiers.pages(cluster_id)
    return tiers.pools.slots(record.device, record.fills)


def test_device_slots_are_reused_until_the_pages_change(tmp_path):
    tiering = _tiering(tmp_path)
    tiers = tiering.tiers
    put(tiering, "cam/c000000", _kv(6, 1), Tier.DEVICE)
    first = tiers.device_slots("cam/c000000")
    assert tiers.device_slots("cam/c000000") is first  # no rebuild while nothing changed
    assert not first.flags.writeable
    tiering.append("cam/c000000", _kv(3, 2))  # a new page: the slots grow
    grown = tiers.device_slots("cam/c000000")
    assert len(grown) == 9 and np.array_equal(grown, _expected_slots(tiers, "cam/c000000"))
    move(tiering, "cam/c000000", Tier.HOST)
    put(tiering, "cam/c000001", _kv(8, 3), Tier.DEVICE)  # may take the pages the move freed
    move(tiering, "cam/c000000", Tier.DEVICE)  # back on other pages
    moved = tiers.device_slots("cam/c000000")
    assert np.array_equal(moved, _expected_slots(tiers, "cam/c000000"))
    assert np.array_equal(tiers.device_slots("cam/c000001"), _expected_slots(tiers, "cam/c000001"))
    tiering.remove("cam/c000000")
    assert "cam/c000000" not in tiers._slots


def test_upload_keeps_values_and_dtype(tmp_path):
    pools = _tiering(tmp_path).tiers.pools
    table = np.array([[3, -1, 7]], dtype=np.int32)
    got = pools.upload(table, torch.int32)
    assert got.dtype == torch.int32 and got.tolist() == [[3, -1, 7]]
    assert pools.upload([5, 2]).dtype == torch.int64


def test_full_mode_builds_one_table_for_every_layer(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, mode="full")
    engine.open_stream("cam", fps=4.0)
    feed(engine, "cam", bikes_frames[:16])
    seen = []
    from mosaic_core.engine import plans

    original = plans.QuestionPlan._rebuild

    def spy(self, layer, selection, shared=None):
        original(self, layer, selection, shared)
        seen.append((layer, self.tables[layer], self.static_tokens[layer]))

    plans.QuestionPlan._rebuild = spy
    try:
        engine.answer("cam", "what moves?", max_new_tokens=2)
    finally:
        plans.QuestionPlan._rebuild = original
    assert [layer for layer, _, _ in seen] == list(range(tiny_model.kv_spec.num_layers))
    assert all(table is seen[0][1] for _, table, _ in seen), "full mode rebuilt its slot table per layer"
    assert seen[0][2] > 0


def test_token_mode_tables_follow_each_layer_choice(tiny_model, bikes_frames):
    """Token mode scores each layer on its own: a layer whose choice differs must get its own table."""
    engine = make_engine(tiny_model, mode="token", retrieval_budget_tokens=54)
    engine.open_stream("cam", fps=4.0)
    feed(engine, "cam", bikes_frames[:24])
    from mosaic_core.engine import plans

    original = plans.QuestionPlan._rebuild
    seen = []

    def spy(self, layer, selection, shared=None):
        original(self, layer, selection, shared)
        static = self.tables[layer][0, : self.static_tokens[layer]].tolist()
        fills = [slab.shape[2] for slab in selection.slabs]
        staged = self.pools.slots(self.staging[: len(fills)], fills)
        expected = np.concatenate([self.past_slots, *selection.device_slots, staged])
        seen.append(static == expected.tolist())

    plans.QuestionPlan._rebuild = spy
    try:
        engine.answer("cam", "what moves?", max_new_tokens=1)
    finally:
        plans.QuestionPlan._rebuild = original
    assert seen and all(seen)
