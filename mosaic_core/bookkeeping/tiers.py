"""Memory tiers, their byte budgets, and planned moves of whole clusters between them.

A cluster's KV bytes live in exactly one tier at a time. Tiers are ordered hot -> cold: a spill moves a
cluster to a larger tier value, a fetch to a smaller one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mosaic_core.errors import ConfigError


class Tier(enum.IntEnum):
    """Where a cluster's KV bytes live, ordered hot -> cold."""

    DEVICE = 0
    HOST = 1
    DISK = 2


@dataclass(frozen=True, kw_only=True)
class TierBudgets:
    """Byte capacity of each tier on one worker.

    Attributes:
        device_bytes: GPU bytes for KV (clusters plus fixed reservations); must be positive.
        host_bytes: pinned host bytes for spilled clusters; 0 means nothing can spill off the GPU.
        disk_bytes: disk bytes for clusters spilled off the host; 0 means there is no disk tier.
    """

    device_bytes: int
    host_bytes: int
    disk_bytes: int = 0

    def __post_init__(self) -> None:
        values = {
            "device_bytes": self.device_bytes,
            "host_bytes": self.host_bytes,
            "disk_bytes": self.disk_bytes,
        }
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"TierBudgets.{name} must be an int, got {value!r}")
            if value < 0:
                raise ConfigError(f"TierBudgets.{name} must be >= 0, got {value}")
        if self.device_bytes <= 0:
            raise ConfigError(f"TierBudgets.device_bytes must be > 0, got {self.device_bytes}")

    def capacity_bytes(self, tier: Tier) -> int:
        """Bytes that ``tier`` can hold (0 for a tier that is switched off)."""
        return (self.device_bytes, self.host_bytes, self.disk_bytes)[Tier(tier)]

    @property
    def enabled_tiers(self) -> tuple[Tier, ...]:
        """The tiers with a non-zero budget, hot -> cold (DEVICE is always first)."""
        return tuple(tier for tier in Tier if self.capacity_bytes(tier) > 0)

    @property
    def total_bytes(self) -> int:
        """Bytes across every tier."""
        return self.device_bytes + self.host_bytes + self.disk_bytes


@dataclass(frozen=True, slots=True)
class Move:
    """Move one whole cluster from tier ``src`` to tier ``dst``."""

    cluster_id: str
    src: Tier
    dst: Tier
    num_bytes: int

    @property
    def is_fetch(self) -> bool:
        """True when the cluster moves to a hotter tier."""
        return self.dst < self.src


@dataclass(slots=True)
class MovePlan:
    """Moves in execution order. An empty plan means nothing has to move."""

    moves: list[Move] = field(default_factory=list)

    @property
    def num_bytes_by_direction(self) -> dict[tuple[Tier, Tier], int]:
        """Bytes per ``(src, dst)`` pair, e.g. ``{(HOST, DEVICE): ...}``: what the transfer layer batches."""
        totals: dict[tuple[Tier, Tier], int] = {}
        for move in self.moves:
            key = (move.src, move.dst)
            totals[key] = totals.get(key, 0) + move.num_bytes
        return totals

    @property
    def num_bytes(self) -> int:
        return sum(move.num_bytes for move in self.moves)

    @property
    def fetches(self) -> list[Move]:
        return [move for move in self.moves if move.is_fetch]

    @property
    def spills(self) -> list[Move]:
        return [move for move in self.moves if not move.is_fetch]
