"""A move that fails part way through a plan (a disk full under a spill, a pool short of pages under a fetch)
leaves every cluster readable, with the bytes it had, and the residency manager's books where the bytes are."""

from __future__ import annotations

import errno

import pytest
import torch

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.errors import CapacityError
from mosaic_core.memory.layout import KVSpec
from mosaic_core.memory.tiers import DiskTier
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
