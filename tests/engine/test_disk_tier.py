"""The optional disk tier: spills reach files, questions read them back, and a reopened directory finds them."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from mosaic_core.bookkeeping.formation import FormationConfig
from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.config import MIB
from mosaic_core.engine.maintenance import merge_clusters
from mosaic_core.memory.tiers import DiskTier
from tests.engine.engine_helpers import feed, make_engine


def test_clusters_spill_to_disk_and_come_back(tiny_model, bikes_frames, tmp_path):
    engine = make_engine(
        tiny_model,
        mode="cluster",
        device_budget_bytes=int(1.3 * MIB),
        host_budget_bytes=int(0.3 * MIB),
        disk_budget_bytes=64 * MIB,
        disk_dir=str(tmp_path),
    )
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:40])
    on_disk = [c for c in engine.clusters("cam") if c.tier == "disk"]
    assert on_disk, "tight device and host budgets must push clusters to disk"
    for tier in Tier:
        residency = engine.tiering.residency
        assert residency.used_bytes(tier) <= residency.capacity_bytes(tier)
    reopened = DiskTier(tmp_path)
    listed = set(reopened.list_clusters("cam"))
    assert {c.cluster_id for c in on_disk} <= listed
    first = on_disk[0]
    assert torch.equal(reopened.read(first.cluster_id), engine.tiering.tiers.read(first.cluster_id))
    answer = engine.answer("cam", "what happened first?", max_new_tokens=1, time_range=(0.0, first.end_s))
    assert answer.retrieval.bytes_fetched > 0
    assert engine.stats().transfer_bytes_by_direction["disk_to_device"] > 0 or (
        engine.stats().transfer_bytes_by_direction["disk_to_host"] > 0
    )


def test_disk_tier_write_is_atomic_and_deletes_cleanly(tmp_path):
    disk = DiskTier(tmp_path)
    kv = torch.randn(2, 2, 1, 5, 4)
    disk.write("s/c000001", kv)
    assert not list(tmp_path.rglob("*.tmp"))
    assert torch.equal(disk.read("s/c000001"), kv)
    disk.delete("s/c000001")
    assert disk.list_clusters("s") == []


def test_a_merged_disk_cluster_leaves_no_spill_file_once_dropped(tiny_model, bikes_frames, tmp_path):
    """Two disk-tier clusters merged are spilled as one before the merged record is durable; fetched from that
    record and dropped later, the stale spill file goes with it."""
    engine = make_engine(
        tiny_model,
        device_budget_bytes=int(1.3 * MIB),
        host_budget_bytes=int(0.3 * MIB),
        data_dir=str(tmp_path),
        formation=FormationConfig(max_tokens=96),
    )
    engine.open_stream("cam", fps=2.0)
    feed(engine, "cam", bikes_frames[:40])
    state, residency = engine.stream("cam"), engine.tiering.residency
    records = [r for r in state.former.records_to_read() if r.sealed and r.cluster_id not in state.local_cluster_ids()]
    left, right = next(
        (a.cluster_id, b.cluster_id) for a, b in itertools.pairwise(records) if a.num_tokens + b.num_tokens <= 96
    )
    for cid in (left, right):  # both spilled to disk, as the budgets do to old clusters
        engine.tiering.execute(residency.plan_spill(cid, Tier.DISK))
    merged = merge_clusters(engine.parts, state, left, right)  # what apply_merges does for a due pair
    assert residency.tier_of(merged) is Tier.DISK
    spill = engine.tiering.tiers.disk.path(merged)
    engine.tiering.execute(residency.plan_fetch(merged, Tier.HOST))  # a question or promote brings it back
    engine.history.store.flush()
    dropped = engine.drop_clusters_before("cam", state.former.get(merged).end_s + 1e-3)
    assert merged in dropped and merged not in residency
    leftovers = sorted(p.name for p in (Path(tmp_path) / ".spill").rglob("*.safetensors"))
    assert not spill.exists(), f"the dropped cluster's spill file outlives it: {leftovers}"
    engine.close()
