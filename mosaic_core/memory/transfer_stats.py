"""Bytes and copy calls moved between the tiers, per direction (``TransferStats``), which ``KVTiers`` counts."""

from __future__ import annotations

from dataclasses import dataclass, field

from mosaic_core.bookkeeping.tiers import Tier

DIRECTIONS = {
    (Tier.HOST, Tier.DEVICE): "host_to_device",
    (Tier.DEVICE, Tier.HOST): "device_to_host",
    (Tier.HOST, Tier.DISK): "host_to_disk",
    (Tier.DISK, Tier.HOST): "disk_to_host",
    (Tier.DEVICE, Tier.DISK): "device_to_disk",
    (Tier.DISK, Tier.DEVICE): "disk_to_device",
}


@dataclass(slots=True)
class TransferStats:
    """Bytes and copy calls per direction, since the engine started."""

    bytes_by_direction: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS.values(), 0))
    copies_by_direction: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS.values(), 0))

    def record(self, src: Tier, dst: Tier, num_bytes: int, num_copies: int = 1) -> None:
        direction = DIRECTIONS[(src, dst)]
        self.bytes_by_direction[direction] += num_bytes
        self.copies_by_direction[direction] += num_copies
