"""``KVTiers``' disk side: a cluster's moves to and from the disk tier, and the disk-tier clusters that a durable
record holds (adopted after a restart, or whose spill file goes once their record is submitted).

A durable cluster's bytes are its record file's, so it spills by dropping its memory copies and comes back by reading
its record; any other cluster's bytes are written to a spill file (``DiskTier``, ``disk_tier.py``). ``DiskMovesMixin``
is mixed into ``KVTiers``: it uses the tiers' ``spec``, ``page_tokens``, ``pools``, ``stats``, ``disk`` and
``durable``, the kept host copies in ``_kept``, and their page helpers (``_take``, ``_set_pages``, ``_free_memory``,
``_before_reuse``, ``_read_in``, ``_fresh``, ``tier_of``).
"""

from __future__ import annotations

import torch

from mosaic_core.bookkeeping.pages import ClusterPages, pages_for
from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.durable.records import from_pages


class DiskMovesMixin:
    """``KVTiers``' moves to and from the disk tier, and its durable disk-tier clusters; mixed into it."""

    def adopt(self, cluster_id: str) -> None:
        """Checks a durable cluster found after a restart, whose record says it is in the disk tier: its bytes
        are its record file's, so no page holds them."""
        assert self.durable is not None and self.durable.owns(cluster_id), f"{cluster_id} has no durable record"
        assert self.tier_of(cluster_id) is Tier.DISK, f"{cluster_id} is adopted into the disk tier"
        self._fresh(cluster_id)

    def drop_spill(self, cluster_id: str) -> None:
        """Deletes the spill file of a cluster whose record was just submitted, if it has one: from now on its bytes
        are read from the record (or the record's snapshot while the file is pending), so the spill file would be
        a second copy on disk that the disk tier's budget does not count."""
        assert self._durable(cluster_id), f"{cluster_id} has no durable record"
        if self.tier_of(cluster_id) is Tier.DISK:  # a fetch deletes the file, so only a disk-tier cluster has one
            self._delete_spill(cluster_id)

    def _move_disk(self, cluster_id: str, record: ClusterPages, src: Tier, dst: Tier) -> int:
        if dst is Tier.DISK:
            kv = None if self._durable(cluster_id) else self._read_in(cluster_id, src)
            num_bytes = record.num_tokens * self.spec.bytes_per_token
            self._to_disk(cluster_id, kv)
            self._before_reuse(cluster_id)
            self._free_memory(record)
            self._kept.pop(cluster_id, None)
        elif self._durable(cluster_id) and (stored := self.durable.read_pages(cluster_id)).shape[4] == self.page_tokens:
            # The record's pages are the arena's size: each lands in one page as one contiguous run.
            num_bytes = stored.numel() * stored.element_size()
            pages = self._take(dst, stored.shape[0])
            self.pools.write_pages(dst, pages, stored)
            record.fills = [self.page_tokens] * stored.shape[0]
            self._set_pages(record, dst, pages)
        else:
            # A record's pages of another size (a frame's, under the arena's default page of the largest frame) are
            # the KV already read: reading the file again for it read and checked every such fetch twice.
            kv = from_pages(stored) if self._durable(cluster_id) else self._read_disk(cluster_id)
            num_bytes = kv.numel() * kv.element_size()
            fills = pages_for(kv.shape[3], self.page_tokens)
            pages = self._take(dst, len(fills))
            self.pools.write(dst, pages, fills, kv)
            record.fills = fills
            self._set_pages(record, dst, pages)
            self._delete_spill(cluster_id)  # only once its bytes are in memory: a failed fetch loses nothing
        self.stats.record(src, dst, num_bytes)
        return num_bytes

    def _to_disk(self, cluster_id: str, kv: torch.Tensor | None) -> None:
        # A durable cluster's bytes are its record file's, or its snapshot's while that file is pending (a stalled
        # disk never holds the engine thread here): nothing to write.
        if not self._durable(cluster_id):
            assert self.disk is not None, "disk tier used but not configured"
            self.disk.write(cluster_id, kv)

    def _durable(self, cluster_id: str) -> bool:
        return self.durable is not None and self.durable.owns(cluster_id)

    def _delete_spill(self, cluster_id: str) -> None:
        if self.disk is not None:
            self.disk.delete(cluster_id)

    def _read_disk(self, cluster_id: str) -> torch.Tensor:
        if self._durable(cluster_id):
            return self.durable.read_kv(cluster_id)
        return self.disk.read(cluster_id)
