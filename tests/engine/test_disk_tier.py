"""The optional disk tier: spills reach files, questions read them back, and a reopened directory finds them."""

from __future__ import annotations

import errno
import itertools
from pathlib import Path

import pytest
import torch

from mosaic_core.bookkeeping.formation_config import FormationConfig
from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.config import MIB
from mosaic_core.engine.maintenance import merge_clusters
from mosaic_core.memory import disk_tier as disk_tier_module
from mosaic_core.memory.disk_tier import DiskTier
from mosaic_core.memory.layout import KVSpec
from tests.engine.engine_helpers import feed, make_engine, spilling_to_disk
from tests.unit.tiering_helpers import make_tiering


def test_clusters_spill_to_disk_and_come_back(tiny_model, bikes_frames, tmp_path):
    engine = spilling_to_disk(tiny_model, tmp_path, mode="cluster")
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


def test_a_write_the_disk_refuses_leaves_no_half_file(tmp_path, monkeypatch):
    disk = DiskTier(tmp_path)

    def disk_fills_up(tensors, path):
        Path(path).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_tier_module, "save_file", disk_fills_up)
    with pytest.raises(OSError, match="No space left"):
        disk.write("s/c000001", torch.randn(2, 2, 1, 5, 4))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert disk.list_clusters("s") == []


def test_the_disk_tier_starts_without_a_previous_process_spill_files_and_keeps_every_other_file(tmp_path):
    """A configured disk_dir is cleared of the spill files a previous process left, as data_dir/.spill is, but of
    nothing else (records, weights, a torn manifest of an older version); writes then go on."""
    earlier = DiskTier(tmp_path)
    earlier.write("cam/c000001", torch.randn(2, 2, 1, 5, 4))
    (tmp_path / "cam" / "c000002.safetensors.tmp").write_bytes(b"half a file")
    (tmp_path / "cam" / "manifest.json").write_text('{"clust')  # torn: its write was not atomic
    (tmp_path / "models" / "x").mkdir(parents=True)
    others = [tmp_path / "cam" / "c000003.mkv", tmp_path / "cam" / "notes.safetensors", tmp_path / "model.safetensors",
              tmp_path / "models" / "x" / "c1.safetensors"]  # fmt: skip
    for path in others:
        path.write_bytes(b"not the disk tier's")
    spec = KVSpec(num_layers=2, num_kv_heads=1, num_q_heads=1, head_dim=4, dtype=torch.float32)

    tiering = make_tiering(spec, tmp_path, device="cpu", page_tokens=4)

    assert not (tmp_path / "cam" / "c000001.safetensors").exists()
    assert not (tmp_path / "cam" / "c000002.safetensors.tmp").exists()
    assert all(path.read_bytes() == b"not the disk tier's" for path in others)
    kv = torch.randn(2, 2, 1, 5, 4)
    tiering.admit("cam/c000004", "cam", kv, prefer=Tier.DISK)
    assert torch.equal(tiering.tiers.read("cam/c000004"), kv)
    assert tiering.tiers.disk.list_clusters("cam") == ["cam/c000004"]


@pytest.mark.parametrize("delete_fails", [False, True])
def test_a_cluster_spilled_before_it_is_durable_keeps_one_copy_on_disk_once_it_is(
    tiny_model, bikes_frames, tmp_path, monkeypatch, delete_fails
):
    """A merge of two disk-tier clusters stores its copy in the disk tier (a spill file) before the merged record is
    submitted; once it is, the record (or its pending snapshot) holds the bytes and the spill file goes at once, not
    at the cluster's next fetch or its drop: the disk would otherwise hold the cluster twice and count it once.
    Fetched and dropped later, the cluster leaves no file behind. A file the disk refuses to delete stays until then,
    and the record is counted all the same."""
    engine = make_engine(
        tiny_model,
        device_budget_bytes=int(1.3 * MIB),
        host_budget_bytes=int(0.3 * MIB),
        data_dir=str(tmp_path),
        formation=FormationConfig(max_tokens=96),
    )
    engine.open_stream("cam", fps=2.0)
    feed(engine, "cam", bikes_frames[:40])
    state, residency, tiers = engine.stream("cam"), engine.tiering.residency, engine.tiering.tiers
    records = [r for r in state.former.records_to_read() if r.sealed and r.cluster_id not in state.local_cluster_ids()]
    left, right = next(
        (a.cluster_id, b.cluster_id) for a, b in itertools.pairwise(records) if a.num_tokens + b.num_tokens <= 96
    )
    for cid in (left, right):
        engine.tiering.execute(residency.plan_spill(cid, Tier.DISK))
    want = torch.cat([tiers.read(left), tiers.read(right)], dim=3)
    if delete_fails:
        real_delete = DiskTier.delete

        def refuse_existing(disk, cluster_id):
            if disk.path(cluster_id).exists():
                raise OSError(errno.EIO, "Input/output error")
            real_delete(disk, cluster_id)

        monkeypatch.setattr(DiskTier, "delete", refuse_existing)
    merged = merge_clusters(engine.parts, state, left, right)
    monkeypatch.undo()
    assert residency.tier_of(merged) is Tier.DISK and merged in engine.history.ledger
    assert tiers.disk.path(merged).exists() is delete_fails, "the spill file outlives its durable record"
    assert torch.equal(tiers.read(merged), want)
    engine.history.store.flush()
    assert torch.equal(tiers.read(merged), want)
    engine.tiering.execute(residency.plan_fetch(merged, Tier.HOST))  # a question or promote brings it back
    assert torch.equal(tiers.read(merged), want)
    dropped = engine.drop_clusters_before("cam", state.former.get(merged).end_s + 1e-3)
    assert merged in dropped and merged not in residency
    leftovers = sorted(p.name for p in (Path(tmp_path) / ".spill").rglob("*.safetensors"))
    assert not tiers.disk.path(merged).exists(), f"the dropped cluster's spill file outlives it: {leftovers}"
    engine.close()
