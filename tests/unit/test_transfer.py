"""The transfer engine and the tiers that use it: bytes arrive intact whatever the streams do meanwhile.

On CUDA these exercise the side stream (moves queued while the compute stream reuses freed memory at once);
on CPU the same calls are plain copies and the same assertions hold.
"""

from __future__ import annotations

import pytest
import torch

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.memory.layout import KVSpec
from mosaic_core.memory.pinned import PinnedPool
from mosaic_core.memory.tiers import KVTiers
from mosaic_core.memory.transfer import TransferEngine

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SPEC = KVSpec(num_layers=3, num_kv_heads=2, num_q_heads=4, head_dim=16, dtype=torch.float32)


def _kv(num_tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, num_tokens, SPEC.head_dim, generator=generator)


def test_spilled_bytes_survive_the_source_being_freed_and_its_memory_reused():
    transfers = TransferEngine(DEVICE)
    expected = [_kv(257, seed) for seed in range(4)]
    spilled = []
    for kv in expected:
        source = kv.to(DEVICE)
        host, moved = transfers.to_host(source, pin=DEVICE.type == "cuda")
        spilled.append((host, moved))
        del source
        torch.zeros(kv.numel(), device=DEVICE).add_(1.0)  # the compute stream grabs freed memory at once
    for (host, moved), kv in zip(spilled, expected, strict=True):
        if moved.ready is not None:
            moved.ready.synchronize()
        assert torch.equal(host, kv)


def test_gather_lands_after_the_compute_stream_waits_for_it():
    transfers = TransferEngine(DEVICE)
    pin = DEVICE.type == "cuda"
    slabs = [_kv(n, seed)[1] for seed, n in enumerate((5, 130, 1))]
    slabs = [s.pin_memory() if pin else s for s in slabs]
    out = torch.full((2, SPEC.num_kv_heads, 3 + 136, SPEC.head_dim), float("nan"), device=DEVICE)
    for batched in (True, False):
        end, moved = transfers.gather(slabs, out, 3, batched=batched)
        transfers.wait(moved)
        assert end == 3 + 136
        assert torch.equal(out[:, :, 3:end].cpu(), torch.cat(slabs, dim=2))
        assert torch.isnan(out[:, :, :3]).all()
        assert moved.seconds() >= 0.0


def test_clusters_moved_back_and_forth_read_back_exactly(tmp_path):
    tiers = KVTiers(SPEC, device=DEVICE, disk_dir=str(tmp_path))
    expected = {f"cam/c{i:06d}": _kv(20 + i, i) for i in range(5)}
    for cluster_id, kv in expected.items():
        tiers.put(cluster_id, kv.to(DEVICE), Tier.DEVICE)
    route = [Tier.HOST, Tier.DEVICE, Tier.HOST, Tier.DISK, Tier.DEVICE]
    for dst in route:  # each move queued right behind the previous one, nothing waited for in between
        for cluster_id in expected:
            tiers.move(cluster_id, dst)
    tiers.append("cam/c000000", _kv(3, 99).to(DEVICE))
    expected["cam/c000000"] = torch.cat([expected["cam/c000000"], _kv(3, 99)], dim=3)
    for cluster_id, kv in expected.items():
        assert tiers.tier_of(cluster_id) is Tier.DEVICE
        assert torch.equal(tiers.read(cluster_id).cpu(), kv)
    moved = sum(tiers.stats.bytes_by_direction.values())
    assert moved > 0


@pytest.mark.parametrize("dst", [Tier.HOST, Tier.DISK])
def test_a_layer_slab_of_a_cluster_just_spilled_is_gathered_intact(tmp_path, dst):
    tiers = KVTiers(SPEC, device=DEVICE, disk_dir=str(tmp_path))
    kv = _kv(40, 7)
    tiers.put("cam/c000001", kv.to(DEVICE), Tier.DEVICE)
    tiers.move("cam/c000001", dst)
    slab = tiers.layer_slab("cam/c000001", 2)
    out = torch.zeros(2, SPEC.num_kv_heads, 40, SPEC.head_dim, device=DEVICE)
    batched = DEVICE.type == "cuda" and slab.is_pinned()
    _, moved = tiers.transfers.gather([slab], out, 0, batched=batched)
    tiers.transfers.wait(moved)
    assert torch.equal(out.cpu(), kv[2])


def test_pool_reuses_released_ranges_and_coalesces_neighbours():
    pool = PinnedPool(8 * 1024, chunk_bytes=4 * 1024, pin=False)
    a = pool.allocate((256,), torch.float32)  # 1 KiB
    b = pool.allocate((256,), torch.float32)
    c = pool.allocate((512,), torch.float32)  # 2 KiB: fills the first chunk
    d = pool.allocate((1024,), torch.float32)  # 4 KiB: the whole second chunk
    assert pool.allocate((1,), torch.float32) is None, "a full pool says so instead of overflowing"
    for t, value in ((a, 1.0), (b, 2.0), (c, 3.0), (d, 4.0)):
        t.fill_(value)
    assert (a == 1).all() and (b == 2).all() and (c == 3).all() and (d == 4).all(), "ranges must not overlap"
    pool.release(a, fence=None)
    pool.release(b, fence=None)
    merged = pool.allocate((512,), torch.float32)  # fits only because a and b coalesced
    assert merged is not None and merged.data_ptr() == a.data_ptr()
    assert (c == 3).all()
    pool.release(merged, fence=None)
    pool.release(c, fence=None)
    pool.release(d, fence=None)
    assert pool.free_bytes == 8 * 1024
    assert pool.allocate((1024,), torch.float32) is not None


def test_tiers_place_spilled_clusters_in_the_pool_and_free_them_on_every_way_out(tmp_path):
    pool = PinnedPool(1 << 20, pin=DEVICE.type == "cuda")
    tiers = KVTiers(SPEC, device=DEVICE, disk_dir=str(tmp_path), pinned_pool=pool)
    kvs = {f"cam/c{i:06d}": _kv(30, i) for i in range(3)}
    for cluster_id, kv in kvs.items():
        tiers.put(cluster_id, kv.to(DEVICE), Tier.HOST)
        assert pool.owns(tiers.read(cluster_id))
    tiers.append("cam/c000000", _kv(2, 50).to(DEVICE))  # grows: a new range, the old one released
    tiers.move("cam/c000001", Tier.DEVICE)
    tiers.move("cam/c000002", Tier.DISK)
    assert torch.equal(tiers.read("cam/c000000"), torch.cat([kvs["cam/c000000"], _kv(2, 50)], dim=3))
    assert torch.equal(tiers.read("cam/c000001").cpu(), kvs["cam/c000001"])
    assert torch.equal(tiers.read("cam/c000002"), kvs["cam/c000002"])
    tiers.delete("cam/c000000")
    assert pool.free_bytes == 1 << 20
