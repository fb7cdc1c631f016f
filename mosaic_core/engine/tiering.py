"""Keeps the residency bookkeeping and the bytes in the tiers in step.

Every placement change goes the same way: the plain-Python ``ResidencyManager`` plans it, ``KVTiers`` moves the
bytes in plan order, then the plan is applied to the bookkeeping (whose change listeners hear each committed move;
the service mirrors tier and location into its metadata store together from them).

A cluster has one record, the residency manager's (tier, size, pins, pages, summary row and co-retrieval counts).
It is made before its bytes are placed (``admit``, ``admit_pages``, a regroup's new clusters) and forgotten before
they are freed (``remove``, ``drop_stream``, a regroup's old clusters), so ``KVTiers`` and the ``SummaryIndex``
always find the record of the bytes and the row they handle, and free both as it ends. A placement that fails (a
disk that refuses a write, a host allocation that fails) changes no count: a new cluster's record is forgotten
again, and a growing cluster's bytes are counted only once its new pages are placed.
"""

from __future__ import annotations

import torch

from mosaic_core.bookkeeping.residency import ResidencyManager
from mosaic_core.bookkeeping.tiers import MovePlan, Tier
from mosaic_core.engine.summaries import SummaryIndex
from mosaic_core.errors import CapacityError
from mosaic_core.memory.tiers import KVTiers


class TierManager:
    """Places whole clusters in tiers under the engine's budgets."""

    def __init__(self, residency: ResidencyManager, tiers: KVTiers, summaries: SummaryIndex) -> None:
        self.residency = residency
        self.tiers = tiers
        self.summaries = summaries
        self.device_hits = 0
        self.device_lookups = 0

    def execute(self, plan: MovePlan) -> int:
        """Runs a plan, each move committed to the residency manager as soon as its bytes have moved, so a move
        that fails (a disk full under a spill) leaves the moves before it counted where their bytes are and its
        own cluster where it was; returns the bytes moved."""
        moved = 0
        for move in plan.moves:
            moved += self.tiers.move(move.cluster_id, move.src, move.dst)
            self.residency.apply(MovePlan([move]))
        return moved

    def admit(
        self, cluster_id: str, stream_id: str, kv: torch.Tensor, *, prefer: Tier, keep: frozenset[str] = frozenset()
    ) -> Tier:
        """Stores a new cluster in the hottest tier from ``prefer`` down that can make room for it without spilling
        ``keep``. When storing it fails, its record is forgotten again and the error raised."""
        tier = self._place_new(cluster_id, stream_id, self.tiers.footprint_bytes(kv.shape[3]), prefer, keep)
        self._placed_or_forgotten(cluster_id, lambda: self.tiers.put(cluster_id, kv, tier))
        return tier

    def admit_pages(self, cluster_id: str, stream_id: str, pages: list[int], fills: list[int], *, prefer: Tier) -> Tier:
        """``admit`` for KV already in device pages (a frame leaving the local window): on the device the pages
        become the cluster's without a copy. When storing them fails the pages stay the caller's."""
        tier = self._place_new(cluster_id, stream_id, len(pages) * self.tiers.pools.page_bytes, prefer)
        self._placed_or_forgotten(cluster_id, lambda: self.tiers.put_pages(cluster_id, pages, fills, tier))
        return tier

    def append(self, cluster_id: str, chunk: torch.Tensor) -> None:
        """Grows a cluster by ``chunk``, spilling others, or moving the cluster colder, to make room."""
        extra = self.tiers.footprint_bytes(chunk.shape[3])
        self._make_room_to_grow(cluster_id, extra)
        self.tiers.append(cluster_id, chunk)
        self._count_growth(cluster_id, extra)

    def append_pages(self, cluster_id: str, pages: list[int], fills: list[int]) -> None:
        """``append`` for KV already in device pages; when placing them fails they stay the caller's."""
        extra = len(pages) * self.tiers.pools.page_bytes
        self._make_room_to_grow(cluster_id, extra)
        self.tiers.append_pages(cluster_id, pages, fills)
        self._count_growth(cluster_id, extra)

    def _place_new(
        self, cluster_id: str, stream_id: str, num_bytes: int, prefer: Tier, keep: frozenset[str] = frozenset()
    ) -> Tier:
        for tier in _tiers_from(prefer):
            if self.residency.capacity_bytes(tier) == 0:
                continue
            plan = self.residency.plan_make_room(tier, num_bytes, exclude=keep)
            if plan is None:
                continue
            self.execute(plan)
            self.residency.add(cluster_id, stream_id, num_bytes, tier)
            return tier
        raise CapacityError(
            f"no tier can hold cluster {cluster_id!r} ({num_bytes} bytes): every tier is full of pinned data; "
            "raise the host or disk budget, or shorten stream retention"
        )

    def _placed_or_forgotten(self, cluster_id: str, place) -> None:
        try:
            place()
        except BaseException:
            self.remove(cluster_id)  # the record made for bytes that never landed; it holds none of them
            raise

    def _make_room_to_grow(self, cluster_id: str, extra: int) -> None:
        """Makes room for ``extra`` more bytes of a cluster in its tier, spilling others, or moving the cluster
        colder; the bytes are counted once placed (``_count_growth``).

        A growing cluster counts as just used: the open cluster of a live camera is the last thing to spill,
        since growing a cluster outside the device tier copies each new frame there.
        """
        self.residency.touch(cluster_id)
        while not self.residency.can_grow(cluster_id, extra):
            tier = self.residency.tier_of(cluster_id)
            plan = self.residency.plan_make_room(tier, extra, exclude=frozenset({cluster_id}))
            if plan is None:
                plan = self._plan_move_colder(cluster_id, tier)
                if plan is None:
                    raise CapacityError(
                        f"no room to grow cluster {cluster_id!r} by {extra} bytes in any tier: what could make room "
                        "is pinned or reserved, or there is no colder tier"
                    )
            self.execute(plan)

    def _count_growth(self, cluster_id: str, extra: int) -> None:
        grown = self.residency.grow(cluster_id, extra)
        assert grown, f"{cluster_id}: room for {extra} bytes was made before its pages were placed"

    def _plan_move_colder(self, cluster_id: str, tier: Tier) -> MovePlan | None:
        """A plan moving the cluster to the next colder tier with a budget, or None: there is none, no room can be
        made there, or the cluster is pinned (a question reads it where it is)."""
        if self.residency.record_to_read(cluster_id).pinned:
            return None
        colder = next((t for t in _tiers_from(tier) if t > tier and self.residency.capacity_bytes(t)), None)
        return None if colder is None else self.residency.plan_spill(cluster_id, colder)

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
        """Forgets a cluster and frees its bytes and summary row (raises, changing nothing, if it is pinned)."""
        record = self.residency.record(cluster_id)
        self.residency.remove(cluster_id)
        self.tiers.free(record)
        self.summaries.free(record.summary)

    def drop_stream(self, stream_id: str) -> list[str]:
        """``remove`` for every cluster of a stream (none is removed if one is pinned); returns their ids."""
        records = [self.residency.record(cid) for cid in self.residency.clusters(stream_id)]
        self.residency.drop_stream(stream_id)
        for record in records:
            self.tiers.free(record)
            self.summaries.free(record.summary)
        return [record.cluster_id for record in records]

    def can_regroup(self, cluster_ids: list[str]) -> bool:
        """Whether ``regroup`` applies: every cluster in the same memory tier, none pinned."""
        tiers = {self.residency.tier_of(cid) for cid in cluster_ids}
        return (
            len(tiers) == 1
            and Tier.DISK not in tiers
            and not any(self.residency.record(cid).pinned for cid in cluster_ids)
        )

    def room_to_copy(self, old_ids: list[str], new_tokens: list[int]) -> bool:
        """Whether new clusters of ``new_tokens`` tokens copied from ``old_ids`` (a merge, a join, a split that
        cannot ``regroup``) would find room in ``admit`` beside them, in their hottest tier or a colder one. The
        copies are stored before the old clusters are removed (so a failed store loses nothing), so the old ones'
        bytes still count and they are never chosen to spill. Asked before any record changes."""
        residency, keep = self.residency, frozenset(old_ids)
        num_bytes = sum(self.tiers.footprint_bytes(n) for n in new_tokens)
        return any(
            residency.capacity_bytes(tier) and residency.plan_make_room(tier, num_bytes, exclude=keep) is not None
            for tier in _tiers_from(min(residency.tier_of(cid) for cid in old_ids))
        )

    def regroup(self, stream_id: str, old_ids: list[str], new: list[tuple[str, int]]) -> Tier:
        """Replaces clusters by new ones made of the same pages, in the same tier, without a copy
        (``KVTiers.regroup``); the bytes stay counted where they are. The old clusters' summary rows are freed:
        the caller gives the new ones theirs."""
        tier, pages = self.tiers.regroup(old_ids, new)
        for cluster_id in old_ids:
            summary = self.residency.summary(cluster_id)
            self.residency.remove(cluster_id)
            self.summaries.free(summary)
        for (cluster_id, num_pages), cluster_pages in zip(new, pages, strict=True):
            num_bytes = num_pages * self.tiers.pools.page_bytes
            self.residency.add(cluster_id, stream_id, num_bytes, tier, pages=cluster_pages)
        return tier

    @property
    def hit_ratio(self) -> float:
        return self.device_hits / self.device_lookups if self.device_lookups else 0.0


def _tiers_from(tier: Tier) -> list[Tier]:
    return [t for t in Tier if t >= tier]


class DeviceRoom:
    """Device pages one reader (a question) takes or holds for a while, inside the device budget.

    ``take`` makes room (spilling unpinned clusters), reserves the bytes and takes fresh pages; ``hold`` keeps
    pages that others own (a stream's sink and window) from being reused while the reader attends to them, and
    reserves their bytes too, since a window frame may leave and its page be given back meanwhile. ``release``
    gives everything back.
    """

    def __init__(self, tiering: TierManager, owner: str) -> None:
        self.tiering = tiering
        self.owner = owner
        self.pages: list[int] = []
        self._reservations: list[str] = []

    def take(self, num_pages: int) -> list[int]:
        self._reserve(num_pages)
        pages = self.tiering.tiers.pools.take(Tier.DEVICE, num_pages)
        assert pages is not None, f"{num_pages} device pages were reserved for {self.owner} but are not free"
        self.pages += pages
        return pages

    def hold(self, pages: list[int]) -> None:
        self._reserve(len(pages))
        self.tiering.tiers.pools.device_pages.share(pages)
        self.pages += pages

    def release(self) -> None:
        if self.pages:
            self.tiering.tiers.pools.give_back(Tier.DEVICE, self.pages)
        for name in self._reservations:
            self.tiering.residency.release(name)
        self.pages, self._reservations = [], []

    def _reserve(self, num_pages: int) -> None:
        if not num_pages:
            return
        residency = self.tiering.residency
        num_bytes = num_pages * self.tiering.tiers.pools.page_bytes
        plan = residency.plan_make_room(Tier.DEVICE, num_bytes)
        if plan is None:
            raise CapacityError(
                f"{self.owner} needs {num_bytes} device bytes ({num_pages} pages); {residency.free_bytes(Tier.DEVICE)} "
                f"of the {residency.capacity_bytes(Tier.DEVICE)}-byte device budget are free and spilling clusters "
                "cannot free the rest: it is reserved (streams' windows, running questions) or pinned"
            )
        self.tiering.execute(plan)
        name = f"{self.owner}#{len(self._reservations)}"
        residency.reserve(name, num_bytes)
        self._reservations.append(name)
