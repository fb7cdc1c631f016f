"""The summary index's rows belong to the clusters' records: freed as a record ends, reused, and compacted when
most are free, with every kept cluster's statistics unchanged."""

from __future__ import annotations

import pytest
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


@pytest.mark.parametrize("stale", [1e4, float("nan"), float("inf")])
def test_key_stats_read_each_pages_filled_tokens_only(tmp_path, stale):
    """A page's slots past its fill hold whatever its memory held before (the pool is never cleared): NaN there
    once made a cluster's summary NaN, and its retrieval score with it."""
    tiering = make_tiering(SPEC, tmp_path, device="cpu", page_tokens=4, device_bytes=1 << 22)
    pools = tiering.tiers.pools
    pages, fills = pools.take(Tier.DEVICE, 3), [4, 1, 3]
    kv = _keys(7, num_tokens=sum(fills))
    pools.device_pool[pages] = stale
    pools.write(Tier.DEVICE, pages, fills, kv)
    sums, sumsqs = pools.key_stats(pages, fills)
    start = 0
    for i, fill in enumerate(fills):
        keys = kv[:, 0, :, start : start + fill]  # [L, H, fill, D]
        assert torch.allclose(sums[i], keys.sum(dim=2)) and torch.allclose(sumsqs[i], keys.square().sum(dim=2))
        start += fill


def test_stats_added_together_equal_stats_added_one_by_one(tmp_path):
    apart = make_tiering(SPEC, tmp_path / "apart", device="cpu", page_tokens=4)
    together = make_tiering(SPEC, tmp_path / "together", device="cpu", page_tokens=4)
    entries = [("cam/c000000", _keys(1)), ("cam/c000001", _keys(2)), ("cam/c000000", _keys(3, num_tokens=2))]
    for tiering in (apart, together):
        put(tiering, "cam/c000000", _keys(0), Tier.DEVICE)
        put(tiering, "cam/c000001", _keys(0), Tier.DEVICE)
    for cluster_id, kv in entries:
        apart.summaries.add(cluster_id, kv[:, 0])
    keys = [kv[:, 0] for _, kv in entries]
    together.summaries.add_stats(
        [cluster_id for cluster_id, _ in entries],
        torch.stack([k.sum(dim=2) for k in keys]),
        torch.stack([k.square().sum(dim=2) for k in keys]),
        [k.shape[2] for k in keys],
    )
    for cluster_id in ("cam/c000000", "cam/c000001"):
        (want, want_count), (got, got_count) = (
            apart.summaries.stats_copy(cluster_id),
            together.summaries.stats_copy(cluster_id),
        )
        assert torch.allclose(got, want) and got_count == want_count
    assert together.summaries.count("cam/c000000") == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="waits for the device exist on CUDA only")
def test_freeing_and_reading_rows_never_waits_for_the_device(tmp_path):
    tiering = make_tiering(SPEC, tmp_path, device="cuda", page_tokens=4, device_bytes=1 << 22)
    summaries = tiering.summaries
    for i in range(3):
        cluster_id, kv = f"cam/c{i:06d}", _keys(i).cuda()
        put(tiering, cluster_id, kv, Tier.DEVICE)
        summaries.add(cluster_id, kv[:, 0])
    kv = _keys(9).cuda()  # made before the check: a copy up from pageable memory waits, and is the test's own
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a copy or read that waits for the device raises
    try:
        summaries.all_layers(["cam/c000000", "cam/c000002"])  # the rows' index goes up without a wait
        tiering.remove("cam/c000001")  # retention: its row is freed without a wait
        put(tiering, "cam/c000009", kv, Tier.DEVICE)
        summaries.add("cam/c000009", kv[:, 0])  # reuses the freed row, zeroing it first, without a wait
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(summaries) == 3


def test_a_reused_row_holds_only_its_new_clusters_statistics(tmp_path):
    """Freeing launches nothing: a freed row keeps its values until reused, and ``add_stats`` zeroes it then, while
    ``put`` overwrites it."""
    tiering = make_tiering(SPEC, tmp_path, device="cpu", page_tokens=4, device_bytes=1 << 22)
    summaries = tiering.summaries
    for i in range(4):
        cluster_id, kv = f"cam/c{i:06d}", _keys(i)
        put(tiering, cluster_id, kv, Tier.DEVICE)
        summaries.add(cluster_id, kv[:, 0])
    freed = [tiering.residency.summary(f"cam/c{i:06d}").row for i in (1, 2)]
    tiering.remove("cam/c000001")
    tiering.remove("cam/c000002")
    added, restored = _keys(11), _keys(12)
    put(tiering, "cam/c000011", added, Tier.DEVICE)
    summaries.add_stats(
        ["cam/c000011", "cam/c000011"],
        torch.stack([added[:, 0, :, :2].sum(dim=2), added[:, 0, :, 2:].sum(dim=2)]),
        torch.stack([added[:, 0, :, :2].square().sum(dim=2), added[:, 0, :, 2:].square().sum(dim=2)]),
        [2, 2],
    )
    put(tiering, "cam/c000012", restored, Tier.DEVICE)
    summaries.put("cam/c000012", restored[:, 0].sum(dim=2), restored[:, 0].square().sum(dim=2), 4.0)
    assert sorted(tiering.residency.summary(c).row for c in ("cam/c000011", "cam/c000012")) == sorted(freed)
    for cluster_id, kv in (("cam/c000011", added), ("cam/c000012", restored)):
        stats, count = summaries.stats_copy(cluster_id)
        assert torch.allclose(stats[0], kv[:, 0].sum(dim=2)) and count == 4.0, cluster_id
        assert torch.allclose(stats[1], kv[:, 0].square().sum(dim=2)), cluster_id
    mean, _, log_count = summaries.all_layers(["cam/c000011", "cam/c000012"])
    assert torch.allclose(mean[0], added[:, 0].sum(dim=2) / 4)
    assert torch.allclose(log_count, torch.full((2,), 4.0).log())


def test_counts_and_all_layers_equal_each_count_and_all_layers_read_apart(tmp_path):
    tiering = make_tiering(SPEC, tmp_path, device="cpu", page_tokens=4, device_bytes=1 << 22)
    summaries = tiering.summaries
    ids = []
    for i, num_tokens in enumerate((4, 1, 3, 4)):
        cluster_id, kv = f"cam/c{i:06d}", _keys(i, num_tokens)
        put(tiering, cluster_id, kv, Tier.DEVICE)
        summaries.add(cluster_id, kv[:, 0])
        ids.append(cluster_id)
    asked = [ids[2], ids[0], ids[3]]  # not in the rows' order
    sizes, (mean, var, log_count) = summaries.counts_and_all_layers(asked)
    assert sizes == [summaries.count(cid) for cid in asked] == [3, 4, 4]
    for got, apart in zip((mean, var, log_count), summaries.all_layers(asked), strict=True):
        assert torch.equal(got, apart)
    # The first layer alone (a question whose anchor is layer 0 reads no more) is the first layer of all of them.
    _, (first_mean, first_var, first_log_count) = summaries.counts_and_all_layers(asked, num_layers=1)
    assert first_mean.shape == (3, 1, SPEC.num_kv_heads, SPEC.head_dim)
    assert torch.equal(first_mean, mean[:, :1]) and torch.equal(first_var, var[:, :1])
    assert torch.equal(first_log_count, log_count)
    assert not torch.equal(mean[:, 1:], mean[:, :1])  # the layers differ: taking the wrong one would show


def test_tracked_ids_is_a_live_view_of_the_tracked_clusters(tmp_path):
    tiering = make_tiering(SPEC, tmp_path, device="cpu", page_tokens=4, device_bytes=1 << 22)
    tracked = tiering.residency.tracked_ids()
    put(tiering, "cam/c000000", _keys(0), Tier.DEVICE)
    assert "cam/c000000" in tracked and "cam/c000001" not in tracked
    tiering.remove("cam/c000000")
    assert "cam/c000000" not in tracked


def test_checksums_sum_each_clusters_absolute_key_sums(tmp_path):
    tiering = make_tiering(SPEC, tmp_path, device="cpu", page_tokens=4, device_bytes=1 << 22)
    summaries = tiering.summaries
    assert summaries.checksums([]) == []
    expected = {}
    for i in range(3):
        cluster_id, kv = f"cam/c{i:06d}", _keys(i)
        put(tiering, cluster_id, kv, Tier.DEVICE)
        summaries.add(cluster_id, kv[:, 0])
        expected[cluster_id] = float(kv[:, 0].double().sum(dim=2).abs().sum())
    tiering.remove("cam/c000001")  # its row is freed and keeps its values until reused
    kept = ["cam/c000002", "cam/c000000"]
    assert summaries.checksums(kept) == pytest.approx([expected[c] for c in kept])
