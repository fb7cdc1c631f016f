"""Keeps the residency bookkeeping and the bytes in the tiers in step.

Every placement change goes the same way: the plain-Python ``ResidencyManager`` plans it, ``KVTiers`` moves the
bytes in plan order, then the plan is applied to the bookkeeping. An optional listener hears each committed move
(the service uses it to update the metadata store atomically).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mosaic_core.bookkeeping.residency import ResidencyManager
from mosaic_core.bookkeeping.tiers import Move, MovePlan, Tier
from mosaic_core.errors import CapacityError
from mosaic_core.memory.tiers import KVTiers

MoveListener = Callable[[Move], None]


class TierManager:
    """Places whole clusters in tiers under the engine's budgets."""

    def __init__(self, residency: ResidencyManager, tiers: KVTiers) -> None:
        self.residency = residency
        self.tiers = tiers
        self.listeners: list[MoveListener] = []
        self.device_hits = 0
        self.device_lookups = 0

    def execute(self, plan: MovePlan) -> int:
        """Runs a plan; returns the bytes moved."""
        moved = 0
        for move in plan.moves:
            moved += self.tiers.move(move.cluster_id, move.dst)
        self.residency.apply(plan)
        for move in plan.moves:
            for listener in self.listeners:
                listener(move)
        return moved

    def admit(self, cluster_id: str, stream_id: str, kv: torch.Tensor, *, prefer: Tier) -> Tier:
        """Stores a new cluster in the hottest tier from ``prefer`` down that can make room for it."""
        num_bytes = kv.numel() * kv.element_size()
        for tier in _tiers_from(prefer):
            if self.residency.capacity_bytes(tier) == 0:
                continue
            plan = self.residency.plan_make_room(tier, num_bytes)
            if plan is None:
                continue
            self.execute(plan)
            self.residency.add(cluster_id, stream_id, num_bytes, tier)
            self.tiers.put(cluster_id, kv, tier)
            return tier
        raise CapacityError(
            f"no tier can hold cluster {cluster_id!r} ({num_bytes} bytes): every tier is full of pinned data; "
            "raise the host or disk budget, or shorten stream retention"
        )

    def append(self, cluster_id: str, chunk: torch.Tensor) -> None:
        """Grows a cluster by ``chunk``, spilling others, or moving the cluster colder, to make room.

        A growing cluster counts as just used: the open cluster of a live camera is the last thing to spill,
        since growing a cluster outside the device tier re-copies it frame after frame.
        """
        extra = chunk.numel() * chunk.element_size()
        self.residency.touch(cluster_id)
        if not self.residency.grow(cluster_id, extra):
            tier = self.residency.tier_of(cluster_id)
            plan = self.residency.plan_make_room(tier, extra, exclude=frozenset({cluster_id}))
            if plan is None:
                colder = next((t for t in _tiers_from(tier) if t > tier and self.residency.capacity_bytes(t)), None)
                plan = None if colder is None else self.residency.plan_spill(cluster_id, colder)
                if plan is None:
                    raise CapacityError(f"no room to grow cluster {cluster_id!r} by {extra} bytes in any tier")
                self.execute(plan)
                return self.append(cluster_id, chunk)
            self.execute(plan)
            grown = self.residency.grow(cluster_id, extra)
            assert grown, f"room was made for cluster {cluster_id} but growing it failed"
        self.tiers.append(cluster_id, chunk)

    def record_lookup(self, *, hit: bool) -> None:
        """A question looked for a cluster on the device (for the cluster-cache hit ratio)."""
        self.device_lookups += 1
        self.device_hits += hit

    def promote(self, cluster_ids: list[str], *, keep: frozenset[str]) -> list[str]:
        """Brings whole clusters to the device where room can be made without spilling ``keep``.

        Called after a question, off its critical path: the clusters it leaned on most become device-resident,
        so the next questions (and the next decode steps of other answers) find them without a copy.
        """
        promoted = []
        for cluster_id in cluster_ids:
            record = self.residency.record(cluster_id)
            if record.tier is Tier.DEVICE or record.pinned:  # another question is reading it where it is
                continue
            plan = self.residency.plan_fetch(cluster_id, Tier.DEVICE, exclude=keep)
            if plan is None:
                break
            self.execute(plan)
            promoted.append(cluster_id)
        return promoted

    def remove(self, cluster_id: str) -> None:
        self.residency.remove(cluster_id)
        self.tiers.delete(cluster_id)

    @property
    def hit_ratio(self) -> float:
        return self.device_hits / self.device_lookups if self.device_lookups else 0.0


def _tiers_from(tier: Tier) -> list[Tier]:
    return [t for t in Tier if t >= tier]
