"""A merge or split whose copy would find no room is refused before anything changes: removing the old clusters
first and then failing to store the new one lost their KV and left the records naming a cluster no tier held."""

from __future__ import annotations

import errno
import itertools

import pytest
import torch

from mosaic_core.bookkeeping.formation_config import FormationConfig
from mosaic_core.bookkeeping.pages import pages_for
from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.config import MIB
from mosaic_core.engine.maintenance import merge_clusters
from mosaic_core.engine.splits import split_cluster
from mosaic_core.errors import CapacityError
from mosaic_core.memory.disk_tier import DiskTier
from tests.engine.engine_helpers import feed, make_engine, spilling_to_disk


def _full_of_pinned(engine, keep: set[str]) -> None:
    """Every cluster but ``keep`` pinned, and the free bytes of the device and the host held by others."""
    residency = engine.tiering.residency
    for cluster_id in residency.tracked_ids() - keep:
        residency.pin(cluster_id)
    residency.reserve("a question's pages", residency.free_bytes(Tier.DEVICE))
    assert residency.charge("keyframes", Tier.HOST, residency.free_bytes(Tier.HOST))


def _adjacent_pair(engine, min_frames: int = 2) -> tuple[str, str]:
    """Two adjacent sealed clusters outside the window that may merge, of ``min_frames`` frames or more together."""
    state = engine.stream("cam")
    in_window = state.local_cluster_ids()
    records = [r for r in state.former.records_to_read() if r.sealed and r.cluster_id not in in_window]
    return next(
        (a.cluster_id, b.cluster_id)
        for a, b in itertools.pairwise(records)
        if a.num_tokens + b.num_tokens <= engine.config.formation.max_tokens
        and a.num_frames + b.num_frames >= min_frames
    )


def _adjacent_in_two_tiers(engine, min_frames: int = 2) -> tuple[str, str]:
    """``_adjacent_pair``, moved to the device and the host: a merge of them copies."""
    tiering = engine.tiering
    residency = tiering.residency
    left, right = _adjacent_pair(engine, min_frames)
    tiering.execute(residency.plan_fetch(left, Tier.DEVICE))
    if residency.tier_of(right) is not Tier.HOST:
        tiering.execute(residency.plan_spill(right, Tier.HOST))
    return left, right


def test_a_merge_with_no_room_for_its_copy_changes_nothing(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, device_budget_bytes=int(1.3 * MIB), host_budget_bytes=int(0.6 * MIB))
    engine.open_stream("cam", fps=2.0)
    feed(engine, "cam", bikes_frames[:40])
    state, tiering = engine.stream("cam"), engine.tiering
    residency = tiering.residency
    left, right = _adjacent_in_two_tiers(engine)
    kv_before = {cid: tiering.tiers.read(cid).clone() for cid in (left, right)}
    records_before = [r.cluster_id for r in state.former.records_to_read()]
    _full_of_pinned(engine, {left, right})

    with pytest.raises(CapacityError):
        merge_clusters(engine.parts, state, left, right)

    assert [r.cluster_id for r in state.former.records_to_read()] == records_before
    assert {residency.tier_of(left), residency.tier_of(right)} == {Tier.DEVICE, Tier.HOST}
    for cluster_id, kv in kv_before.items():
        assert torch.equal(tiering.tiers.read(cluster_id), kv)


def test_a_split_with_no_room_for_its_halves_copies_changes_nothing(tiny_model, bikes_frames):
    """Pages of 32 slots for frames of 18 tokens: two clusters merged across tiers are copied into whole pages
    (six frames into four pages), and halves cut where they need more pages than that must copy into room there
    is not."""
    engine = make_engine(
        tiny_model,
        page_tokens=32,
        formation=FormationConfig(max_tokens=128),
        retrieval_budget_tokens=128,
        device_budget_bytes=int(1.3 * MIB),
        host_budget_bytes=4 * MIB,
    )
    engine.open_stream("cam", fps=2.0)
    feed(engine, "cam", bikes_frames[:40])
    state, tiering = engine.stream("cam"), engine.tiering
    merged = merge_clusters(engine.parts, state, *_adjacent_in_two_tiers(engine, min_frames=3))
    record = state.former.get(merged)
    tokens = record.frame_num_tokens
    cut = next(  # halves packed into more pages than the whole
        c
        for c in range(1, len(tokens))
        if len(pages_for(sum(tokens[:c]), 32)) + len(pages_for(sum(tokens[c:]), 32))
        > len(tiering.tiers.pages(merged).fills)
    )
    kv_before = tiering.tiers.read(merged).clone()
    records_before = [r.cluster_id for r in state.former.records_to_read()]
    tier_before = tiering.residency.tier_of(merged)
    _full_of_pinned(engine, {merged})

    with pytest.raises(CapacityError):
        split_cluster(engine.parts, state, record, record.frame_indices[cut])

    assert [r.cluster_id for r in state.former.records_to_read()] == records_before
    assert tiering.residency.tier_of(merged) is tier_before
    assert torch.equal(tiering.tiers.read(merged), kv_before)


def test_a_merge_and_a_split_whose_copies_the_disk_refuses_change_nothing(tiny_model, bikes_frames, tmp_path):
    """Clusters in the disk tier merged, then split, by copying: the copy is written before the old clusters go, so
    a disk that refuses it (full) leaves the records and the old clusters' KV as they were, and no record of a
    cluster with no file. The old clusters used to be removed first."""
    engine = spilling_to_disk(
        tiny_model,
        tmp_path,
        page_tokens=32,  # frames of 18 tokens: a merged copy is packed into whole pages, so its split copies too
        formation=FormationConfig(max_tokens=128),
        retrieval_budget_tokens=128,
    )
    engine.open_stream("cam", fps=2.0)
    feed(engine, "cam", bikes_frames[:40])
    state, tiering = engine.stream("cam"), engine.tiering
    residency = tiering.residency
    left, right = _adjacent_pair(engine)
    for cluster_id in (left, right):
        if residency.tier_of(cluster_id) is not Tier.DISK:
            tiering.execute(residency.plan_spill(cluster_id, Tier.DISK))

    def refused(cluster_ids, replace):
        kv_before = {cid: tiering.tiers.read(cid).clone() for cid in cluster_ids}
        records_before = [r.cluster_id for r in state.former.records_to_read()]
        tracked_before = set(residency.tracked_ids())
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(DiskTier, "write", _disk_full)
            with pytest.raises(OSError, match="No space left"):
                replace()
        assert [r.cluster_id for r in state.former.records_to_read()] == records_before
        assert set(residency.tracked_ids()) == tracked_before
        for cluster_id, kv in kv_before.items():
            assert residency.tier_of(cluster_id) is Tier.DISK
            assert torch.equal(tiering.tiers.read(cluster_id), kv)
        residency.check_invariants()

    refused([left, right], lambda: merge_clusters(engine.parts, state, left, right))
    merged = merge_clusters(engine.parts, state, left, right)  # the disk writes again
    assert residency.tier_of(merged) is Tier.DISK
    record = state.former.get(merged)
    assert tiering.tiers.pages(merged).fills != [18] * record.num_frames  # repacked: the halves are copies
    refused([merged], lambda: split_cluster(engine.parts, state, record, record.frame_indices[1]))


def _disk_full(self, cluster_id, kv):
    raise OSError(errno.ENOSPC, "No space left on device")
