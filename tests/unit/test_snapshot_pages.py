"""A sealed cluster's record pages, taken from pool pages that hold one frame each (frames shorter than a page)."""

from __future__ import annotations

import pytest
import torch

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.durable.records import to_pages
from mosaic_core.memory.layout import KVSpec
from tests.unit.tiering_helpers import make_tiering, move

SPEC = KVSpec(num_layers=2, num_kv_heads=2, num_q_heads=2, head_dim=8, dtype=torch.float32)
PAGE_TOKENS, FRAME_TOKENS, FRAMES = 8, 6, 3


def _cluster_of_frames(tmp_path, device: str):
    """A cluster of ``FRAMES`` frames of ``FRAME_TOKENS`` tokens, each in a pool page of its own, as ingest leaves
    them; returns the tiering and the frames' KV back to back."""
    tiering = make_tiering(SPEC, tmp_path, device=device, page_tokens=PAGE_TOKENS, device_bytes=1 << 22)
    pools = tiering.tiers.pools
    frames = [torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, FRAME_TOKENS, SPEC.head_dim) for _ in range(FRAMES)]
    for i, kv in enumerate(frames):
        page = pools.take(Tier.DEVICE, 1)
        pools.write(Tier.DEVICE, page, [FRAME_TOKENS], kv.to(device))
        if i == 0:
            tiering.admit_pages("cam/c0", "cam", page, [FRAME_TOKENS], prefer=Tier.DEVICE)
        else:
            tiering.append_pages("cam/c0", page, [FRAME_TOKENS])
    return tiering, torch.cat(frames, dim=3)


@pytest.mark.parametrize("tier", [Tier.DEVICE, Tier.HOST])
def test_one_frame_pages_snapshot_without_reading_the_cluster(tmp_path, tier, monkeypatch):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiering, kv = _cluster_of_frames(tmp_path, device)
    if tier is Tier.HOST:
        move(tiering, "cam/c0", Tier.HOST)
    tiers = tiering.tiers

    def whole_cluster_read(*args, **kwargs):
        raise AssertionError("the snapshot read the whole cluster and cut it into pages again")

    monkeypatch.setattr(tiers.pools, "read", whole_cluster_read)
    pages, ready = tiers.snapshot_pages("cam/c0", FRAME_TOKENS)
    if ready is not None:
        ready.synchronize()
    assert pages.device.type == "cpu"
    assert pages.shape == (FRAMES, SPEC.num_layers, 2, SPEC.num_kv_heads, FRAME_TOKENS, SPEC.head_dim)
    torch.testing.assert_close(pages, to_pages(kv, FRAME_TOKENS), rtol=0, atol=0)
