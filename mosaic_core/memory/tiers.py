"""Where cluster KV bytes physically live: device tensors, host tensors (pinned under CUDA) and disk files.

``ResidencyManager`` (plain Python) decides; this module only does. Each cluster is one contiguous tensor
``[num_layers, 2, num_kv_heads, num_tokens, head_dim]`` in exactly one tier; moving it is one copy, queued on the
transfer engine's side stream under CUDA. Until that copy has run, the cluster is "moving": ``read`` waits for it
(the compute stream for device bytes, the host for host bytes), while ``layer_slab`` does not, because its reader
is a gather queued on the same side stream after the move.

With a ``DurableStore``, a sealed cluster's bytes also live in its record file. Such a cluster spills to the disk
tier by dropping its memory copy (no write), and comes back by reading its record, which stays. Only clusters
that are not durable yet (open, or still partly in the local window) are written to separate spill files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.durable.store import DurableStore
from mosaic_core.errors import UnknownClusterError
from mosaic_core.memory.layout import KVSpec
from mosaic_core.memory.pinned import PinnedPool
from mosaic_core.memory.transfer import Moved, TransferEngine

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


class DiskTier:
    """Cluster files under one directory; reopening the directory finds them again.

    Layout: ``<root>/<stream_id>/<cluster name>.safetensors``, where the cluster id is ``<stream_id>/<name>``.
    A ``manifest.json`` per stream lists the clusters written there, so a restarted worker can rebuild.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, cluster_id: str) -> Path:
        return self.root / f"{cluster_id}.safetensors"

    def write(self, cluster_id: str, kv: torch.Tensor) -> None:
        path = self.path(cluster_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"kv": kv.contiguous().cpu()}, str(tmp))
        os.replace(tmp, path)  # a reader never sees half a file
        self._update_manifest(cluster_id, present=True)

    def read(self, cluster_id: str) -> torch.Tensor:
        path = self.path(cluster_id)
        if not path.exists():
            raise UnknownClusterError(f"cluster {cluster_id!r} has no file in the disk tier at {self.root}")
        return load_file(str(path))["kv"]

    def delete(self, cluster_id: str) -> None:
        self.path(cluster_id).unlink(missing_ok=True)
        self._update_manifest(cluster_id, present=False)

    def list_clusters(self, stream_id: str) -> list[str]:
        manifest = self.root / stream_id / "manifest.json"
        if not manifest.exists():
            return []
        return json.loads(manifest.read_text())["clusters"]

    def _update_manifest(self, cluster_id: str, *, present: bool) -> None:
        stream_id = cluster_id.rsplit("/", 1)[0]
        manifest = self.root / stream_id / "manifest.json"
        clusters = set(self.list_clusters(stream_id))
        (clusters.add if present else clusters.discard)(cluster_id)
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"clusters": sorted(clusters)}))


class KVTiers:
    """Holds every cluster's KV tensor in the tier the residency manager put it in."""

    def __init__(
        self,
        spec: KVSpec,
        *,
        device: torch.device,
        disk_dir: str | None = None,
        pinned_pool: PinnedPool | None = None,
        durable: DurableStore | None = None,
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.pin_host = self.device.type == "cuda"
        self.pool = pinned_pool
        self.disk = DiskTier(disk_dir) if disk_dir else None
        self.durable = durable
        self.stats = TransferStats()
        self.transfers = TransferEngine(self.device)
        self._tensors: dict[str, torch.Tensor] = {}
        self._tiers: dict[str, Tier] = {}
        self._moving: dict[str, Moved] = {}

    def __contains__(self, cluster_id: str) -> bool:
        return cluster_id in self._tiers

    def tier_of(self, cluster_id: str) -> Tier:
        try:
            return self._tiers[cluster_id]
        except KeyError:
            raise UnknownClusterError(f"cluster {cluster_id!r} holds no KV in any tier") from None

    def put(self, cluster_id: str, kv: torch.Tensor, tier: Tier) -> None:
        """Stores a new cluster's KV ``[L, 2, H, n, D]`` in ``tier``."""
        assert cluster_id not in self._tiers, f"cluster {cluster_id} stored twice"
        self._store(cluster_id, kv, tier)

    def append(self, cluster_id: str, chunk: torch.Tensor) -> None:
        """Grows a cluster by ``chunk`` ``[L, 2, H, n, D]`` along the token axis, in its current tier."""
        tier = self.tier_of(cluster_id)
        current = self.read(cluster_id)
        # Concatenate where the cluster lives, so a host-tier cluster never makes a round trip to the device.
        grown = torch.cat([current, chunk.to(current.device)], dim=3)
        self._tensors.pop(cluster_id)
        self._store(cluster_id, grown, tier)
        self._release(current)

    def read(self, cluster_id: str) -> torch.Tensor:
        """The whole cluster, where it lives (disk clusters are read into host memory), safe to use from the
        compute stream and the host."""
        tier = self.tier_of(cluster_id)
        if tier is Tier.DISK:
            return self._read_disk(cluster_id)
        self._settle(cluster_id)
        return self._tensors[cluster_id]

    def adopt(self, cluster_id: str) -> None:
        """Registers a durable cluster found after a restart: it lives in the disk tier, in its record file."""
        assert self.durable is not None and self.durable.owns(cluster_id), f"{cluster_id} has no durable record"
        assert cluster_id not in self._tiers, f"cluster {cluster_id} adopted twice"
        self._tiers[cluster_id] = Tier.DISK

    def snapshot(self, cluster_id: str) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """A host copy of a (sealed, no longer growing) cluster that later moves cannot touch, and the event
        after which it is filled (None when it is filled already)."""
        kv = self.read(cluster_id)
        if kv.is_cuda:
            host, moved = self.transfers.to_host(kv, pin=False)
            return host, moved.ready
        if self.pool is not None and self.pool.owns(kv):
            return kv.clone(), None  # pooled memory is handed out again once the cluster moves
        return kv, None  # a plain host tensor is never written in place: a move or growth makes a new one

    def _durable(self, cluster_id: str) -> bool:
        return self.durable is not None and self.durable.owns(cluster_id)

    def _delete_spill(self, cluster_id: str) -> None:
        if self.disk is not None and self.disk.path(cluster_id).exists():
            self.disk.delete(cluster_id)

    def _read_disk(self, cluster_id: str) -> torch.Tensor:
        if self._durable(cluster_id):
            return self.durable.read_kv(cluster_id)
        return self.disk.read(cluster_id)

    def layer_slab(self, cluster_id: str, layer: int) -> torch.Tensor:
        """One layer ``[2, H, n, D]`` of a cluster where it lives: a view on device or host (pinned under
        CUDA); a disk cluster's layer is read into pinned memory."""
        tier = self.tier_of(cluster_id)
        if tier is Tier.DISK:
            slab = self._read_disk(cluster_id)[layer]
            return slab.pin_memory() if self.pin_host else slab
        return self._tensors[cluster_id][layer]

    def move(self, cluster_id: str, dst: Tier) -> int:
        """Moves a whole cluster to ``dst`` in one copy; returns the bytes moved."""
        src = self.tier_of(cluster_id)
        if src is dst:
            return 0
        # Between host and device the copy is queued behind any earlier move of the cluster: no wait needed.
        kv = self.read(cluster_id) if Tier.DISK in (src, dst) else self._tensors[cluster_id]
        num_bytes = kv.numel() * kv.element_size()
        if src is Tier.DISK:
            self._delete_spill(cluster_id)
        self._tensors.pop(cluster_id, None)
        self._store(cluster_id, kv, dst)
        self._release(kv)  # after the copy out of it was queued
        self.stats.record(src, dst, num_bytes)
        return num_bytes

    def delete(self, cluster_id: str) -> None:
        tier = self._tiers.pop(cluster_id, None)
        self._moving.pop(cluster_id, None)
        tensor = self._tensors.pop(cluster_id, None)
        if tensor is not None:
            self._release(tensor)
        if tier is Tier.DISK:
            self._delete_spill(cluster_id)  # a durable record is removed through the store's journal

    def _store(self, cluster_id: str, kv: torch.Tensor, tier: Tier) -> None:
        if tier is Tier.DISK:
            if self._durable(cluster_id):
                self.durable.wait_durable(cluster_id)  # its record file holds the bytes: nothing to write
            else:
                assert self.disk is not None, "disk tier used but not configured"
                self.disk.write(cluster_id, kv)
            self._tensors.pop(cluster_id, None)
            self._tiers[cluster_id] = tier
            return
        if tier is Tier.HOST:
            out = None if self.pool is None else self.pool.allocate(kv.shape, kv.dtype)
            stored, moved = self.transfers.to_host(kv, pin=self.pin_host, out=out)
        else:
            stored, moved = self.transfers.to_device(kv)
        self._tensors[cluster_id] = stored
        self._tiers[cluster_id] = tier
        if moved.ready is None:
            self._moving.pop(cluster_id, None)
        else:
            self._moving[cluster_id] = moved

    def _release(self, tensor: torch.Tensor) -> None:
        """Gives a pooled host tensor's range back once the moves queued so far (its readers) have run."""
        if self.pool is not None and self.pool.owns(tensor):
            self.pool.release(tensor, fence=self.transfers.fence())

    def _settle(self, cluster_id: str) -> None:
        moved = self._moving.pop(cluster_id, None)
        if moved is None:
            return
        if self._tensors[cluster_id].is_cuda:
            self.transfers.wait(moved)
        else:
            moved.ready.synchronize()
