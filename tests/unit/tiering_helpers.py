"""A ``TierManager`` over small pools for byte-level tests of ``KVTiers``, and a one-move plan runner.

``KVTiers`` keeps no record of its own (the residency manager owns every cluster's tier and pages), so tests of
its bytes place and move clusters the way the engine does: through the tier manager.
"""

from __future__ import annotations

import torch

from mosaic_core.bookkeeping.residency import ResidencyManager
from mosaic_core.bookkeeping.tiers import Move, MovePlan, Tier, TierBudgets
from mosaic_core.engine.summaries import SummaryIndex
from mosaic_core.engine.tiering import TierManager
from mosaic_core.memory.layout import KVSpec
from mosaic_core.memory.tiers import KVTiers


def make_tiering(
    spec: KVSpec, tmp_path, *, device, page_tokens: int, device_bytes: int = 1 << 20, host_bytes: int = 1 << 20
) -> TierManager:
    residency = ResidencyManager(TierBudgets(device_bytes=device_bytes, host_bytes=host_bytes, disk_bytes=1 << 30))
    tiers = KVTiers(
        spec,
        residency,
        device=torch.device(device),
        page_tokens=page_tokens,
        device_bytes=device_bytes,
        host_bytes=host_bytes,
        disk_dir=str(tmp_path),
    )
    return TierManager(residency, tiers, SummaryIndex(spec, residency, device=torch.device(device)))


def put(tiering: TierManager, cluster_id: str, kv: torch.Tensor, tier: Tier) -> None:
    placed = tiering.admit(cluster_id, "cam", kv, prefer=tier)
    assert placed is tier, f"{cluster_id} went to {placed.name}, not {tier.name}"


def move(tiering: TierManager, cluster_id: str, dst: Tier) -> int:
    """Moves one cluster as a plan of one move; returns the bytes copied."""
    record = tiering.residency.record(cluster_id)
    return tiering.execute(MovePlan([Move(cluster_id, record.tier, dst, record.num_bytes)]))
