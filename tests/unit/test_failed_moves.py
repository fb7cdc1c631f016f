"""A move that fails part way through a plan (a disk full under a spill, a pool short of pages under a fetch)
leaves every cluster readable, with the bytes it had, and the residency manager's books where the bytes are."""

from __future__ import annotations

import errno

import pytest
import torch

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.errors import CapacityError
from mosaic_core.memory import arena
from mosaic_core.memory.arena import PagePools
from mosaic_core.memory.disk_tier import DiskTier
from mosaic_core.memory.layout import KVSpec
from tests.unit.tiering_helpers import make_tiering, move, put

SPEC = KVSpec(num_layers=2, num_kv_heads=2, num_q_heads=2, head_dim=8, dtype=torch.float32)


def _kv(num_tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, num_tokens, SPEC.head_dim,
                       generator=torch.Generator().manual_seed(seed))  # fmt: skip


def test_a_spill_refused_by_a_full_disk_leaves_every_cluster_where_the_books_say(tmp_path, monkeypatch):
    tiering = make_tiering(SPEC, tmp_path, device="cpu", page_tokens=4, device_bytes=1 << 12, host_bytes=4096)
    kept = {"cam/c000000": _kv(8, 0), "cam/c000001": _kv(8, 1)}
    for cluster_id, kv in kept.items():
        put(tiering, cluster_id, kv, Tier.HOST)
    writes = []
    write = DiskTier.write

    def second_write_finds_the_disk_full(self, cluster_id, kv):
        writes.append(cluster_id)
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, cluster_id, kv)

    monkeypatch.setattr(DiskTier, "write", second_write_finds_the_disk_full)
    with pytest.raises(OSError, match="No space left"):
        tiering.admit("cam/c000002", "cam", _kv(16, 2), prefer=Tier.HOST)  # room only with both spilled
    assert len(writes) == 2
    spilled, refused = writes
    assert tiering.residency.tier_of(spilled) is Tier.DISK
    assert tiering.residency.tier_of(refused) is Tier.HOST
    tiering.residency.check_invariants()
    for cluster_id, kv in kept.items():
        assert torch.equal(tiering.tiers.read(cluster_id), kv)


def test_a_fetch_short_of_pages_keeps_the_spill_file(tmp_path):
    tiering = make_tiering(SPEC, tmp_path, device="cpu", page_tokens=4, device_bytes=1 << 12, host_bytes=4096)
    kv = _kv(8, 3)
    put(tiering, "cam/c000000", kv, Tier.HOST)
    move(tiering, "cam/c000000", Tier.DISK)
    taken = []  # every free host page, taken behind the books' back
    while len(taken) < 64 and (page := tiering.tiers.pools.take(Tier.HOST, 1)) is not None:
        taken += page
    with pytest.raises(CapacityError):
        move(tiering, "cam/c000000", Tier.HOST)
    tiering.tiers.pools.give_back(Tier.HOST, taken)
    assert tiering.residency.tier_of("cam/c000000") is Tier.DISK
    assert torch.equal(tiering.tiers.read("cam/c000000"), kv)


def _disk_full(self, cluster_id, kv):
    raise OSError(errno.ENOSPC, "No space left on device")


def _pinning_fails(self, num_pages):
    raise RuntimeError("CUDA error: out of memory (pinning a host chunk)")


def test_a_growth_the_disk_refuses_counts_no_bytes_and_leaves_the_pages_to_the_caller(tmp_path, monkeypatch):
    tiering = make_tiering(SPEC, tmp_path, device="cpu", page_tokens=4, device_bytes=1 << 14, host_bytes=4096)
    kv = _kv(8, 4)
    put(tiering, "cam/c000000", kv, Tier.DISK)  # not durable: its spill file is rewritten as it grows
    pools, residency = tiering.tiers.pools, tiering.residency
    before = residency.record("cam/c000000").num_bytes
    pages = pools.take(Tier.DEVICE, 1)
    pools.write(Tier.DEVICE, pages, [4], _kv(4, 5))
    monkeypatch.setattr(DiskTier, "write", _disk_full)

    with pytest.raises(OSError, match="No space left"):
        tiering.append_pages("cam/c000000", pages, [4])

    assert residency.record("cam/c000000").num_bytes == before
    assert residency.used_bytes(Tier.DISK) == before
    assert torch.equal(tiering.tiers.read("cam/c000000"), kv)
    assert pools.device_pages.num_used == 1  # still the caller's, to keep or give back
    residency.check_invariants()


def test_a_growth_whose_host_pages_cannot_be_pinned_counts_no_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(arena, "HOST_CHUNK_BYTES", 4096)  # host pages pinned 4 at a time, up to the budget
    tiering = make_tiering(SPEC, tmp_path, device="cpu", page_tokens=4, device_bytes=1 << 14, host_bytes=1 << 14)
    kv = _kv(4, 6)
    put(tiering, "cam/c000000", kv, Tier.HOST)
    pools, residency = tiering.tiers.pools, tiering.residency
    taken = pools.take(Tier.HOST, pools.host_pages.num_free)  # the next host page needs a new chunk
    before = residency.record("cam/c000000").num_bytes
    pages = pools.take(Tier.DEVICE, 1)
    monkeypatch.setattr(PagePools, "_grow_host", _pinning_fails)

    with pytest.raises(RuntimeError, match="pinning"):
        tiering.append_pages("cam/c000000", pages, [4])

    pools.give_back(Tier.HOST, taken)
    assert residency.record("cam/c000000").num_bytes == before
    assert residency.record("cam/c000000").pages.fills == [4]
    assert torch.equal(tiering.tiers.read("cam/c000000"), kv)
    residency.check_invariants()


def test_a_new_cluster_the_disk_refuses_leaves_no_record(tmp_path, monkeypatch):
    tiering = make_tiering(SPEC, tmp_path, device="cpu", page_tokens=4, device_bytes=1 << 12, host_bytes=4096)
    monkeypatch.setattr(DiskTier, "write", _disk_full)

    with pytest.raises(OSError, match="No space left"):
        tiering.admit("cam/c000000", "cam", _kv(8, 7), prefer=Tier.DISK)

    assert "cam/c000000" not in tiering.residency
    assert tiering.residency.used_bytes(Tier.DISK) == 0
    tiering.residency.check_invariants()


def test_a_host_copy_kept_ahead_is_skipped_when_pinning_fails(tmp_path, monkeypatch):
    """``keep_host_copy`` only saves a later spill its copy: an allocation that fails skips it, raising nothing."""
    monkeypatch.setattr(arena, "HOST_CHUNK_BYTES", 4096)
    tiering = make_tiering(SPEC, tmp_path, device="cpu", page_tokens=4, device_bytes=1 << 14, host_bytes=1 << 14)
    put(tiering, "cam/c000000", _kv(8, 8), Tier.DEVICE)
    pools = tiering.tiers.pools
    pools.take(Tier.HOST, pools.host_pages.num_free)  # the copy's pages need a new chunk
    monkeypatch.setattr(PagePools, "_grow_host", _pinning_fails)

    assert tiering.tiers.keep_host_copy("cam/c000000") == 0
    assert tiering.tiers.pages("cam/c000000").host is None
