"""Counts of the clusters ``ResidencyManager`` tracks and their bytes: the engine's (``ResidencyStats``) and one
stream's (``StreamUsage``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mosaic_core.bookkeeping.tiers import Tier


@dataclass(slots=True)
class ResidencyStats:
    """A snapshot for metrics. Device used bytes include reservations."""

    device_used_bytes: int
    device_capacity_bytes: int
    host_used_bytes: int
    host_capacity_bytes: int
    disk_used_bytes: int
    disk_capacity_bytes: int
    reserved_bytes: int
    num_device_clusters: int
    num_host_clusters: int
    num_disk_clusters: int
    num_pinned: int

    @property
    def num_clusters(self) -> int:
        return self.num_device_clusters + self.num_host_clusters + self.num_disk_clusters


@dataclass(slots=True)
class StreamUsage:
    """One stream's tracked clusters and their bytes, per tier, kept up to date as they change, so that reading
    them (GetStream, ListStreams) does not walk the stream's history."""

    clusters: dict[Tier, int] = field(default_factory=lambda: dict.fromkeys(Tier, 0))
    num_bytes: dict[Tier, int] = field(default_factory=lambda: dict.fromkeys(Tier, 0))

    def count(self, tier: Tier, clusters: int, num_bytes: int) -> None:
        self.clusters[tier] += clusters
        self.num_bytes[tier] += num_bytes
