"""Where cluster KV bytes physically live: pages of the arena's device and host pools, and disk files.

``ResidencyManager`` (plain Python) decides which tier a cluster is in and owns its record; this module only
moves the bytes, and fills in the record's ``ClusterPages``: its pages in token order, with page ids in each pool
that holds a copy. It keeps no record of its own: a cluster's tier and pages are read from the residency
manager, which made the record before the bytes were placed and forgets it after they are freed. What this module
keeps per cluster is torch-side only: the last move the host may have to wait for, the device slots it computed,
and which device clusters keep a host copy (oldest first).

- Appending a frame takes fresh pages in the cluster's tier and writes the frame there: O(1), no regrowth.
- Host copies are kept. A cluster fetched to the device keeps its host pages, so the device copy is a cache:
  spilling it again frees its device pages without copying. A cluster that completes on the device can be given
  its host copy then (``keep_host_copy``), so that its first spill does not copy either. An append drops the
  (now stale) host copy, so the copy that stays is that of a cluster that no longer grows, i.e. a sealed one.
  When the host pool runs short, kept copies of device-resident clusters are dropped first, oldest first.
- Moves between the pools are queued on the transfer engine's side stream, and the compute stream waits for
  each right away (a device-side wait: the host does not stop), so compute never reads or reuses a page a move
  has not finished with. The host waits for a cluster's last move only before it reads the bytes itself. The one
  exception is a host copy kept ahead (``keep_host_copy``): it only reads device pages that no longer change, so
  compute waits for it only before those pages go back to the pool.

With a ``DurableStore``, a sealed cluster's bytes also live in its record file. Such a cluster spills to the disk
tier by dropping its memory copies (no write), and comes back by reading its record, which stays. Only clusters
that are not durable yet (open, or still partly in the local window, or a merge's, join's or split's copy before its
record is submitted) are written to separate spill files, and such a file goes as the cluster's record is submitted
(``drop_spill``). The spill files themselves are ``DiskTier``'s (``disk_tier.py``), the moves to and from the disk
tier are ``DiskMovesMixin``'s (``disk_moves.py``, mixed into ``KVTiers``), and the bytes and copies counted per
direction are ``TransferStats``' (``transfer_stats.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from mosaic_core.bookkeeping.cluster_residency import ClusterResidency
from mosaic_core.bookkeeping.pages import ClusterPages, pages_for
from mosaic_core.bookkeeping.residency import ResidencyManager
from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.durable.records import to_pages
from mosaic_core.durable.staging import StagingArena
from mosaic_core.durable.store import DurableStore
from mosaic_core.errors import CapacityError
from mosaic_core.memory.arena import PagePools
from mosaic_core.memory.disk_moves import DiskMovesMixin
from mosaic_core.memory.disk_tier import DiskTier
from mosaic_core.memory.layout import KVSpec
from mosaic_core.memory.transfer import Moved, TransferEngine
from mosaic_core.memory.transfer_stats import TransferStats


class KVTiers(DiskMovesMixin):
    """Holds every cluster's KV in the tier the residency manager put it in, as pages of the arena."""

    def __init__(
        self,
        spec: KVSpec,
        residency: ResidencyManager,
        *,
        device: torch.device,
        page_tokens: int,
        device_bytes: int,
        host_bytes: int,
        pinned_host_bytes: int = 0,
        grow_device: bool = False,
        disk_dir: str | None = None,
        durable: DurableStore | None = None,
    ) -> None:
        self.spec = spec
        self.residency = residency
        self.device = torch.device(device)
        self.pin_host = self.device.type == "cuda"
        self.disk = DiskTier(disk_dir) if disk_dir else None
        if self.disk is not None:
            self.disk.clear()  # no cluster is tracked yet: a spill file there is a previous process's
        self.durable = durable
        self.stats = TransferStats()
        self.transfers = TransferEngine(self.device)
        self.pools = PagePools(
            spec,
            page_tokens=page_tokens,
            device=self.device,
            device_bytes=device_bytes,
            host_bytes=host_bytes,
            pinned_host_bytes=pinned_host_bytes,
            grow_device=grow_device,
            transfers=self.transfers,
        )
        self._kept: dict[str, None] = {}  # device-tier clusters that also keep their host pages, oldest first
        self._moving: dict[str, Moved] = {}  # the last move of a cluster that the host may have to wait for
        self._slots: dict[str, tuple[list[int], int, np.ndarray]] = {}  # device_slots' cache: pages, count, slots

    @property
    def page_tokens(self) -> int:
        return self.pools.page_tokens

    def footprint_bytes(self, num_tokens: int) -> int:
        """Bytes the pages of ``num_tokens`` new tokens take in a pool (whole pages)."""
        return len(pages_for(num_tokens, self.page_tokens)) * self.pools.page_bytes

    def tier_of(self, cluster_id: str) -> Tier:
        return self.residency.tier_of(cluster_id)

    def device_slots(self, cluster_id: str):
        """Slots of a device-tier cluster's tokens in the device pool, in order (``PagePools.slots``).

        Kept until the cluster's device pages change: a question reads them for every layer it scores, and full
        mode's questions for every cluster, so building them each time was per-layer, per-cluster numpy work.
        """
        record = self.pages(cluster_id)  # no wait: the compute stream waits for every move (``_after_move``)
        pages = self._pages_in(record, Tier.DEVICE)
        cached = self._slots.get(cluster_id)
        # Page lists are replaced, not edited, when a cluster gains or moves pages; the length guards the rest.
        if cached is not None and cached[0] is pages and len(cached[2]) == record.num_tokens:
            return cached[2]
        slots = self.pools.slots(pages, record.fills)
        slots.flags.writeable = False  # shared by every caller until the pages change
        self._slots[cluster_id] = (pages, len(pages), slots)
        return slots

    def pages(self, cluster_id: str) -> ClusterPages:
        """The cluster's page record (read it, do not change it)."""
        return self.residency.pages(cluster_id)

    def put(self, cluster_id: str, kv: torch.Tensor, tier: Tier) -> None:
        """Stores a new cluster's KV ``[L, 2, H, n, D]`` in ``tier`` (its record's, made just before)."""
        record = self._fresh(cluster_id)
        fills = pages_for(kv.shape[3], self.page_tokens)
        if tier is not Tier.DISK:
            pages = self._take(tier, len(fills))
            self.pools.write(tier, pages, fills, kv)
            self._set_pages(record, tier, pages)
        else:
            self._to_disk(cluster_id, kv)
        record.fills = fills  # once the bytes are there: a failed write leaves a record of no tokens

    def append(self, cluster_id: str, chunk: torch.Tensor) -> None:
        """Grows a cluster by ``chunk`` ``[L, 2, H, n, D]`` in its current tier: new pages, nothing regrown."""
        tier = self.tier_of(cluster_id)
        record = self.pages(cluster_id)
        if tier is Tier.DISK:  # only a cluster that is not durable yet can grow there: rewrite its spill file
            kv = torch.cat([self._read_disk(cluster_id), chunk.cpu()], dim=3)
            self.disk.write(cluster_id, kv)
            record.fills += pages_for(chunk.shape[3], self.page_tokens)
            return
        self._settle(cluster_id)
        self._drop_kept(cluster_id)  # the host copy no longer has every page
        fills = pages_for(chunk.shape[3], self.page_tokens)
        pages = self._take(tier, len(fills))
        self.pools.write(tier, pages, fills, chunk)
        record.fills += fills
        self._set_pages(record, tier, self._pages_in(record, tier) + pages)

    def put_pages(self, cluster_id: str, pages: list[int], fills: list[int], tier: Tier) -> None:
        """A new cluster from device pages already written (a frame leaving the local window). In the device tier
        the pages become the cluster's, without a copy; elsewhere they are copied there and handed back."""
        self._place_pages(self._fresh(cluster_id), tier, pages, fills)

    def append_pages(self, cluster_id: str, pages: list[int], fills: list[int]) -> None:
        """Grows a cluster by device pages already written, placed as ``put_pages`` places them."""
        tier = self.tier_of(cluster_id)
        if tier is not Tier.DISK:
            self._settle(cluster_id)
            self._drop_kept(cluster_id)  # the host copy no longer has every page
        self._place_pages(self.pages(cluster_id), tier, pages, fills)

    def _place_pages(self, record: ClusterPages, tier: Tier, pages: list[int], fills: list[int]) -> None:
        if tier is Tier.DEVICE:
            record.device = (record.device or []) + pages
        elif tier is Tier.HOST:
            host = self._take(Tier.HOST, len(pages))
            self._after_move(record.cluster_id, self.pools.copy(Tier.DEVICE, pages, Tier.HOST, host))
            self.pools.give_back(Tier.DEVICE, pages)
            record.host = (record.host or []) + host
        else:  # only a cluster that is not durable yet can be here and grow: (re)write its spill file
            kv = self.pools.read(Tier.DEVICE, pages, fills).cpu()
            if record.num_pages:
                kv = torch.cat([self._read_disk(record.cluster_id), kv], dim=3)
            self._to_disk(record.cluster_id, kv)
            self.pools.give_back(Tier.DEVICE, pages)
        record.fills += fills

    def read(self, cluster_id: str) -> torch.Tensor:
        """The whole cluster ``[L, 2, H, n, D]`` as a new tensor where it lives (disk clusters are read into host
        memory), safe to use from the compute stream and the host."""
        return self._read_in(cluster_id, self.tier_of(cluster_id))

    def _read_in(self, cluster_id: str, tier: Tier) -> torch.Tensor:
        if tier is Tier.DISK:
            return self._read_disk(cluster_id)
        self._settle(cluster_id)
        record = self.pages(cluster_id)
        return self.pools.read(tier, self._pages_in(record, tier), record.fills)

    def snapshot_pages(
        self, cluster_id: str, page_tokens: int, staging: StagingArena | None = None
    ) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """A host copy of a (sealed, no longer growing) cluster as record pages ``[P, L, 2, H, page_tokens, D]``
        that later moves cannot touch, and the event after which it is filled (None when it is filled already).

        When every page of the cluster holds ``page_tokens`` tokens (pool pages of that length, full, or longer pages
        holding one frame each), the record's pages are the pool pages' first ``page_tokens`` slots, gathered in one
        copy; otherwise the cluster is read and cut into pages where it lives. From the device the copy goes into
        pinned memory on the side stream, so the caller does not wait: a pageable copy would hold the engine thread
        until the device had run everything queued before it. That memory comes from ``staging`` when given (pinned
        once, up front; this may wait for room in it), else from the caching host allocator."""
        tier = self.tier_of(cluster_id)
        record = self.pages(cluster_id)
        if tier is not Tier.DISK and page_tokens <= self.page_tokens and all(f == page_tokens for f in record.fills):
            self._settle(cluster_id)
            pages = self.pools.gather(tier, self._pages_in(record, tier), page_tokens)  # a new tensor, like ``read``'s
        else:
            pages = to_pages(self.read(cluster_id), page_tokens)
        if pages.is_cuda:
            num_bytes = pages.numel() * pages.element_size()
            out = staging.take(pages.shape, pages.dtype) if staging is not None and staging.fits(num_bytes) else None
            host, moved = self.transfers.to_host(pages, pin=True, out=out)
            return host, moved.ready
        return pages, None

    def keep_host_copy(self, cluster_id: str) -> int:
        """Gives a device-tier cluster that no longer grows its host copy now, ahead of any spill: the copy is
        queued on the side stream and nothing waits for it, so the spill that later makes room (a question's, in
        the question's time) frees the device pages without copying. Returns the bytes queued; 0 when the cluster
        is not on the device, already keeps a copy, or the host pool has no free pages within its budget (then
        nothing is dropped to make room, and a spill copies as before), or pinning more host memory failed (the copy
        is only ahead of time: the spill will copy)."""
        if self.tier_of(cluster_id) is not Tier.DEVICE:
            return 0
        record = self.pages(cluster_id)
        if record.host is not None:
            return 0
        try:
            host = self.pools.take(Tier.HOST, record.num_pages)
        except RuntimeError:  # torch's allocation failures (pinning a host chunk) are RuntimeErrors
            return 0
        if host is None:
            return 0
        moved = self.pools.copy(Tier.DEVICE, record.device, Tier.HOST, host)
        if moved.ready is not None:
            self._moving[cluster_id] = moved  # the host waits for it before reading; compute before reusing pages
        record.host = host
        self._kept[cluster_id] = None
        num_bytes = record.num_pages * self.pools.page_bytes
        self.stats.record(Tier.DEVICE, Tier.HOST, num_bytes)
        return num_bytes

    def layer_slabs(self, cluster_id: str, layer: int) -> list[torch.Tensor]:
        """One layer of a cluster where it lives, one ``[2, H, fill, D]`` view per page (device or host, pinned
        under CUDA); a disk cluster's layer is read into pinned memory and cut into page-sized views."""
        tier = self.tier_of(cluster_id)
        if tier is Tier.DISK:  # one pinned slab, cut into page-sized views so that it stages like pages
            slab = self._read_disk(cluster_id)[layer]
            slab = slab.pin_memory() if self.pin_host else slab
            return [slab[:, :, t : t + self.page_tokens] for t in range(0, slab.shape[2], self.page_tokens)]
        record = self.pages(cluster_id)
        pages = self._pages_in(record, tier)
        return [self.pools.layer_slab(tier, p, layer, f) for p, f in zip(pages, record.fills, strict=True)]

    def host_pages(self, cluster_id: str) -> tuple[list[int], list[int]]:
        """The pages of a host-resident cluster in the host pool, and how many tokens each holds."""
        record = self.pages(cluster_id)
        return self._pages_in(record, Tier.HOST), record.fills

    def move(self, cluster_id: str, src: Tier, dst: Tier) -> int:
        """Moves a whole cluster from ``src`` to ``dst`` (a plan's move, before the residency manager commits it,
        so the record still names the tier the plan started from); returns the bytes copied (0 when a kept copy
        made a copy needless)."""
        if src is dst:
            return 0
        record = self.pages(cluster_id)
        if Tier.DISK in (src, dst):
            return self._move_disk(cluster_id, record, src, dst)
        num_bytes = record.num_pages * self.pools.page_bytes
        if dst is Tier.HOST and record.host is not None:  # spill of a kept copy: free the device pages, no copy
            self._before_reuse(cluster_id)
            self.pools.give_back(Tier.DEVICE, record.device)
            record.device = None
            self._kept.pop(cluster_id, None)
            return 0
        pages = self._take(dst, record.num_pages)
        moved = self.pools.copy(src, self._pages_in(record, src), dst, pages)
        self._after_move(cluster_id, moved)
        self._set_pages(record, dst, pages)
        if src is Tier.DEVICE:
            self.pools.give_back(Tier.DEVICE, record.device)
            record.device = None
        else:
            self._kept[cluster_id] = None  # fetched: its host pages stay, the device copy is a cache
        self.stats.record(src, dst, num_bytes)
        return num_bytes

    def regroup(self, old_ids: list[str], new: list[tuple[str, int]]) -> tuple[Tier, list[ClusterPages]]:
        """Cuts the pages of ``old_ids`` (their tokens in this order, all in one memory tier) into the page
        records of the clusters ``new``, as ``(id, number of pages)`` in order, without copying a byte: a merge or
        join at page boundaries, or a split at a frame boundary (each frame starts pages of its own). A device
        cluster's kept host copy is given back. Returns the tier and the new page records, which the residency
        manager's new records take (``ResidencyManager.add(pages=...)``) as it forgets the old ones.
        """
        tier = self.tier_of(old_ids[0])
        assert tier is not Tier.DISK and all(self.tier_of(cid) is tier for cid in old_ids), "regroup in one memory tier"
        pages: list[int] = []
        fills: list[int] = []
        for cluster_id in old_ids:
            self._settle(cluster_id)
            self._drop_kept(cluster_id)
            record = self.pages(cluster_id)
            self._moving.pop(cluster_id, None)
            self._slots.pop(cluster_id, None)
            pages += self._pages_in(record, tier)
            fills += record.fills
        assert sum(n for _, n in new) == len(pages), f"{len(pages)} pages cannot make clusters of {new}"
        made, start = [], 0
        for cluster_id, num_pages in new:
            record = ClusterPages(cluster_id, fills[start : start + num_pages])
            self._set_pages(record, tier, pages[start : start + num_pages])
            made.append(record)
            start += num_pages
        return tier, made

    def free(self, cluster: ClusterResidency) -> None:
        """Frees the bytes of a cluster the residency manager has just forgotten (its last record)."""
        cluster_id = cluster.cluster_id
        self._before_reuse(cluster_id)
        self._moving.pop(cluster_id, None)
        self._kept.pop(cluster_id, None)
        self._slots.pop(cluster_id, None)
        self._free_memory(cluster.pages)
        self._delete_spill(cluster_id)  # a durable record goes through the store's journal instead

    # -- internals ------------------------------------------------------------------------------------------
    def _take(self, tier: Tier, num_pages: int) -> list[int]:
        pages = self.pools.take(tier, num_pages)
        while pages is None and tier is Tier.HOST and self._kept:
            oldest = next(iter(self._kept))
            self._drop_kept(oldest)
            pages = self.pools.take(tier, num_pages)
        if pages is None:
            raise CapacityError(
                f"the {tier.name.lower()} page pool has no {num_pages} free pages of {self.pools.page_bytes} bytes; "
                "its budget is smaller than what the residency manager placed there"
            )
        return pages

    def _drop_kept(self, cluster_id: str) -> None:
        """Frees the host pages a device-tier cluster keeps as its copy."""
        if cluster_id not in self._kept:
            return
        del self._kept[cluster_id]
        record = self.pages(cluster_id)
        self.pools.give_back(Tier.HOST, record.host)
        record.host = None

    def _fresh(self, cluster_id: str) -> ClusterPages:
        """The page record of a cluster whose record was just made: no page yet."""
        record = self.pages(cluster_id)
        assert not record.num_pages and not record.in_memory, f"cluster {cluster_id} stored twice"
        return record

    def _free_memory(self, record: ClusterPages) -> None:
        if record.device is not None:
            self.pools.give_back(Tier.DEVICE, record.device)
        if record.host is not None:
            self.pools.give_back(Tier.HOST, record.host)
        record.device = record.host = None

    @staticmethod
    def _pages_in(record: ClusterPages, tier: Tier) -> list[int]:
        pages = record.device if tier is Tier.DEVICE else record.host
        assert pages is not None, f"cluster {record.cluster_id} has no pages in the {tier.name} pool"
        return pages

    @staticmethod
    def _set_pages(record: ClusterPages, tier: Tier, pages: list[int]) -> None:
        if tier is Tier.DEVICE:
            record.device = pages
        else:
            record.host = pages

    def _after_move(self, cluster_id: str, moved: Moved) -> None:
        # The compute stream waits for the move on the device, so it never reads a page before it is filled nor
        # writes a page a spill still reads; the host waits only if it reads the cluster itself (``_settle``).
        self.transfers.wait(moved)
        if moved.ready is not None:
            self._moving[cluster_id] = moved

    def _before_reuse(self, cluster_id: str) -> None:
        """Before a cluster's device pages go back to the pool: the compute stream, which may write them next, waits
        (on the device) for a move still reading them, such as the host copy ``keep_host_copy`` queued."""
        moved = self._moving.get(cluster_id)
        if moved is not None:
            self.transfers.wait(moved)

    def _settle(self, cluster_id: str) -> None:
        moved = self._moving.pop(cluster_id, None)
        if moved is not None and moved.ready is not None:
            moved.ready.synchronize()
