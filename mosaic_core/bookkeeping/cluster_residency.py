"""One cluster's residency record (``ClusterResidency``) and the live parts that other owners fill in.

``ResidencyManager`` makes a record when it starts tracking a cluster and ends it when it stops: the summary row
(``SummaryRow``) and the co-retrieval counts (``CoRetrieval``) end with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mosaic_core.bookkeeping.pages import ClusterPages
from mosaic_core.bookkeeping.tiers import Tier


@dataclass(slots=True)
class SummaryRow:
    """Where a cluster's key statistics are kept in the engine's summary index: its row there (None until its
    first keys arrive) and how many tokens they sum."""

    row: int | None = None
    num_tokens: int = 0


@dataclass(slots=True)
class CoRetrieval:
    """What questions retrieved of a cluster: how many retrieved it, its neighbours in its stream's order, and,
    for the pair it forms with the cluster after it (``right``), how many questions retrieved either of the two
    and how many both since they became neighbours."""

    num_retrievals: int = 0
    left: str | None = None
    right: str | None = None
    pair_either: int = 0
    pair_joint: int = 0


@dataclass(slots=True)
class ClusterResidency:
    """One cluster's record: the tier its KV lives in, its size, how many readers pin it there, its pages in
    each memory pool (empty in the disk tier), its summary row and its co-retrieval counts. The last three are
    live objects that ``record()``'s copies share."""

    cluster_id: str
    stream_id: str
    num_bytes: int
    tier: Tier
    pages: ClusterPages
    pin_count: int = 0
    summary: SummaryRow = field(default_factory=SummaryRow)
    co_retrieval: CoRetrieval = field(default_factory=CoRetrieval)

    @property
    def on_device(self) -> bool:
        return self.tier == Tier.DEVICE

    @property
    def on_host(self) -> bool:
        return self.tier == Tier.HOST

    @property
    def on_disk(self) -> bool:
        return self.tier == Tier.DISK

    @property
    def pinned(self) -> bool:
        return self.pin_count > 0
