"""The transfer engine and the tiers that use it: bytes arrive intact whatever the streams do meanwhile.

On CUDA these exercise the side stream (moves queued while the compute stream reuses freed memory at once);
on CPU the same calls are plain copies and the same assertions hold.
"""

from __future__ import annotations

import pytest
import torch

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.engine.tiering import TierManager
from mosaic_core.errors import StateError, UnknownClusterError
from mosaic_core.memory.layout import KVSpec
from mosaic_core.memory.transfer import TransferEngine
from tests.unit.tiering_helpers import make_tiering, move, put

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


def _tiering(tmp_path, *, page_tokens: int = 8, **budgets) -> TierManager:
    return make_tiering(SPEC, tmp_path, device=DEVICE, page_tokens=page_tokens, **budgets)


def test_clusters_moved_back_and_forth_read_back_exactly(tmp_path):
    tiering = _tiering(tmp_path)
    tiers = tiering.tiers
    expected = {f"cam/c{i:06d}": _kv(20 + i, i) for i in range(5)}
    for cluster_id, kv in expected.items():
        put(tiering, cluster_id, kv.to(DEVICE), Tier.DEVICE)
    route = [Tier.HOST, Tier.DEVICE, Tier.HOST, Tier.DISK, Tier.DEVICE]
    for dst in route:  # each move queued right behind the previous one, nothing waited for in between
        for cluster_id in expected:
            move(tiering, cluster_id, dst)
    tiering.append("cam/c000000", _kv(3, 99).to(DEVICE))
    expected["cam/c000000"] = torch.cat([expected["cam/c000000"], _kv(3, 99)], dim=3)
    for cluster_id, kv in expected.items():
        assert tiers.tier_of(cluster_id) is Tier.DEVICE
        assert torch.equal(tiers.read(cluster_id).cpu(), kv)
    moved = sum(tiers.stats.bytes_by_direction.values())
    assert moved > 0


@pytest.mark.parametrize("dst", [Tier.HOST, Tier.DISK])
def test_a_layer_slab_of_a_cluster_just_spilled_is_gathered_intact(tmp_path, dst):
    tiering = _tiering(tmp_path)
    tiers = tiering.tiers
    kv = _kv(40, 7)
    put(tiering, "cam/c000001", kv.to(DEVICE), Tier.DEVICE)
    move(tiering, "cam/c000001", dst)
    slabs = tiers.layer_slabs("cam/c000001", 2)
    out = torch.zeros(2, SPEC.num_kv_heads, 40, SPEC.head_dim, device=DEVICE)
    batched = DEVICE.type == "cuda" and all(s.is_pinned() for s in slabs)
    _, moved = tiers.transfers.gather(slabs, out, 0, batched=batched)
    tiers.transfers.wait(moved)
    assert torch.equal(out.cpu(), kv[2])


def test_appending_takes_new_pages_and_never_moves_the_old_ones(tmp_path):
    tiering = _tiering(tmp_path, page_tokens=4)
    tiers = tiering.tiers
    put(tiering, "cam/c000000", _kv(4, 1).to(DEVICE), Tier.DEVICE)
    first = list(tiers.pages("cam/c000000").device)
    page_before = tiers.pools.page(Tier.DEVICE, first[0]).clone()
    for seed in range(2, 6):
        tiering.append("cam/c000000", _kv(3, seed).to(DEVICE))  # a 3-token frame starts a page of its own
    record = tiers.pages("cam/c000000")
    assert record.device[:1] == first and record.fills == [4, 3, 3, 3, 3]
    assert torch.equal(tiers.pools.page(Tier.DEVICE, first[0]), page_before)
    expected = torch.cat([_kv(4, 1)] + [_kv(3, s) for s in range(2, 6)], dim=3)
    assert torch.equal(tiers.read("cam/c000000").cpu(), expected)


def test_a_fetched_cluster_keeps_its_host_copy_and_spills_again_without_a_copy(tmp_path):
    tiering = _tiering(tmp_path)
    tiers = tiering.tiers
    kv = _kv(24, 3)
    put(tiering, "cam/c000000", kv.to(DEVICE), Tier.HOST)
    host_pages = list(tiers.pages("cam/c000000").host)
    assert move(tiering, "cam/c000000", Tier.DEVICE) == 3 * tiers.pools.page_bytes
    free_before = tiers.pools.device_pages.num_free
    assert move(tiering, "cam/c000000", Tier.HOST) == 0, "the kept host copy makes the spill free"
    assert tiers.pools.device_pages.num_free == free_before + 3
    assert tiers.pages("cam/c000000").host == host_pages and tiers.pages("cam/c000000").device is None
    assert torch.equal(tiers.read("cam/c000000"), kv)
    move(tiering, "cam/c000000", Tier.DEVICE)
    tiering.append("cam/c000000", _kv(2, 9).to(DEVICE))  # a growing cluster's host copy is stale: dropped
    assert tiers.pages("cam/c000000").host is None
    assert move(tiering, "cam/c000000", Tier.HOST) > 0
    assert torch.equal(tiers.read("cam/c000000"), torch.cat([kv, _kv(2, 9)], dim=3))


def test_a_host_copy_kept_ahead_makes_the_first_spill_free_and_reads_back_exactly(tmp_path):
    tiering = _tiering(tmp_path)
    tiers = tiering.tiers
    kv = _kv(20, 4)
    put(tiering, "cam/c000000", kv.to(DEVICE), Tier.DEVICE)
    to_host_before = tiers.stats.bytes_by_direction["device_to_host"]
    assert tiers.keep_host_copy("cam/c000000") == 3 * tiers.pools.page_bytes
    assert tiers.keep_host_copy("cam/c000000") == 0, "a cluster that keeps a copy is not copied twice"
    torch.zeros(kv.numel(), device=DEVICE).add_(1.0)  # compute runs on meanwhile; nothing waited for the copy
    assert move(tiering, "cam/c000000", Tier.HOST) == 0, "the spill frees the device pages without a copy"
    put(tiering, "cam/c000001", _kv(20, 5).to(DEVICE), Tier.DEVICE)  # takes the pages the spill gave back
    assert tiers.stats.bytes_by_direction["device_to_host"] == to_host_before + 3 * tiers.pools.page_bytes
    assert torch.equal(tiers.read("cam/c000000"), kv)
    assert torch.equal(tiers.read("cam/c000001").cpu(), _kv(20, 5))
    assert tiers.keep_host_copy("cam/c000000") == 0, "a host-tier cluster needs no copy"


def test_a_host_copy_ahead_is_skipped_when_the_host_pool_is_full(tmp_path):
    page_bytes = 8 * SPEC.bytes_per_token
    tiering = _tiering(tmp_path, host_bytes=2 * page_bytes)
    tiers = tiering.tiers
    put(tiering, "cam/c000000", _kv(16, 1).to(DEVICE), Tier.HOST)  # fills the host pool
    put(tiering, "cam/c000001", _kv(8, 2).to(DEVICE), Tier.DEVICE)
    assert tiers.keep_host_copy("cam/c000001") == 0
    assert tiers.pages("cam/c000001").host is None
    assert tiers.pages("cam/c000000").host is not None, "nothing held on the host is dropped for it"


def test_a_short_host_pool_drops_kept_copies_before_it_gives_up(tmp_path):
    page_bytes = 8 * SPEC.bytes_per_token
    tiering = _tiering(tmp_path, host_bytes=4 * page_bytes)
    tiers = tiering.tiers
    put(tiering, "cam/c000000", _kv(16, 1).to(DEVICE), Tier.HOST)
    move(tiering, "cam/c000000", Tier.DEVICE)  # keeps its 2 host pages
    put(tiering, "cam/c000001", _kv(32, 2).to(DEVICE), Tier.HOST)  # needs all 4: the kept copy goes
    assert tiers.pages("cam/c000000").host is None
    assert torch.equal(tiers.read("cam/c000000").cpu(), _kv(16, 1))
    assert torch.equal(tiers.read("cam/c000001"), _kv(32, 2))


def test_every_way_out_gives_every_page_back(tmp_path):
    tiering = _tiering(tmp_path)
    tiers = tiering.tiers
    device_free, host_free = tiers.pools.device_pages.num_free, None
    for i in range(3):
        put(tiering, f"cam/c{i:06d}", _kv(30, i).to(DEVICE), Tier.HOST)
    host_free = tiers.pools.host_pages.num_free + tiers.pools.host_pages.num_used
    tiering.append("cam/c000000", _kv(2, 50).to(DEVICE))
    move(tiering, "cam/c000001", Tier.DEVICE)
    move(tiering, "cam/c000002", Tier.DISK)
    assert torch.equal(tiers.read("cam/c000002"), _kv(30, 2))
    for i in range(3):
        tiering.remove(f"cam/c{i:06d}")
    tiers.pools.take(Tier.HOST, 0)  # reclaims fenced host pages
    assert tiers.pools.device_pages.num_free == device_free
    assert tiers.pools.host_pages.num_free == host_free


def test_a_cluster_has_one_record_the_residency_managers(tmp_path):
    tiering = _tiering(tmp_path)
    kv = _kv(20, 4)
    put(tiering, "cam/c000000", kv.to(DEVICE), Tier.DEVICE)
    assert tiering.tiers.pages("cam/c000000") is tiering.residency.pages("cam/c000000")
    tiering.summaries.add("cam/c000000", kv[:, 0].to(DEVICE))
    summary = tiering.residency.summary("cam/c000000")
    row = summary.row
    assert row is not None and summary.num_tokens == 20 and len(tiering.summaries) == 1
    move(tiering, "cam/c000000", Tier.HOST)
    record = tiering.residency.record("cam/c000000")
    assert record.tier is Tier.HOST and record.pages.host and record.pages.device is None
    tiering.residency.pin("cam/c000000")
    with pytest.raises(StateError):
        tiering.remove("cam/c000000")  # refused before a byte is freed
    assert torch.equal(tiering.tiers.read("cam/c000000"), kv)
    tiering.residency.unpin("cam/c000000")
    host_free = tiering.tiers.pools.host_pages.num_free
    tiering.remove("cam/c000000")
    with pytest.raises(UnknownClusterError):
        tiering.tiers.pages("cam/c000000")
    tiering.tiers.pools.take(Tier.HOST, 0)  # reclaims fenced host pages
    assert tiering.tiers.pools.host_pages.num_free == host_free + 3
    assert len(tiering.summaries) == 0, "the summary row ended with the record"
    put(tiering, "cam/c000001", kv.to(DEVICE), Tier.DEVICE)
    tiering.summaries.add("cam/c000001", kv[:, 0].to(DEVICE))
    assert summary.row is None and tiering.residency.summary("cam/c000001").row == row
    key_sum = tiering.summaries.stats_copy("cam/c000001")[0][0].cpu()
    assert torch.allclose(key_sum, kv[:, 0].float().sum(dim=2)), "the reused row starts from zero"
