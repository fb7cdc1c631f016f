"""The summary index's rows belong to the clusters' records: freed as a record ends, reused, and compacted when
most are free, with every kept cluster's statistics unchanged."""

from __future__ import annotations

import torch

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.memory.layout import KVSpec
from tests.unit.tiering_helpers import make_tiering, put

SPEC = KVSpec(num_layers=2, num_kv_heads=2, num_q_heads=2, head_dim=8, dtype=torch.float32)


def _keys(seed: int, num_tokens: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, num_tokens, SPEC.head_dim, generator=generator)


def test_rows_follow_the_records_and_shrink_when_most_are_free(tmp_path):
    tiering = make_tiering(SPEC, tmp_path, device="cpu", page_tokens=4, device_bytes=1 << 22)
    summaries, residency = tiering.summaries, tiering.residency
    expected = {}
    for i in range(40):
        cluster_id, kv = f"cam/c{i:06d}", _keys(i)
        put(tiering, cluster_id, kv, Tier.DEVICE)
        summaries.add(cluster_id, kv[:, 0])
        expected[cluster_id] = kv[:, 0].sum(dim=2)
    assert summaries.capacity == 64 and len(summaries) == 40
    kept = list(expected)[::5]  # 8 clusters, spread over the rows
    for cluster_id in list(expected):
        if cluster_id not in kept:
            tiering.remove(cluster_id)
    assert len(summaries) == 8 and summaries.capacity == 16, "64 rows with 8 in use compact to 16"
    assert sorted(residency.summary(cid).row for cid in kept) == list(range(8))
    for cluster_id in kept:
        stats, count = summaries.stats_copy(cluster_id)
        assert torch.allclose(stats[0], expected[cluster_id]) and count == 4.0
    mean, _, log_count = summaries.all_layers(kept)
    assert torch.allclose(mean[3], expected[kept[3]] / 4) and torch.allclose(log_count, torch.full((8,), 4.0).log())
    residency.check_invariants()
    for cluster_id in kept:
        tiering.remove(cluster_id)
    assert len(summaries) == 0 and summaries.capacity == 16
