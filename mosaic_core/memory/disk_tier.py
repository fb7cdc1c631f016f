"""The disk tier's own files: spill files of clusters that have no durable record yet (``DiskTier``).

``KVTiers`` (``tiers.py``) decides when a cluster's bytes go to such a file and when they come back
(``DiskMovesMixin``, ``disk_moves.py``); this module only names, writes, reads and deletes the files.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mosaic_core.errors import UnknownClusterError

_SPILL_NAME = re.compile(r"(c\d+)\.safetensors(\.tmp)?")  # ``DiskTier``'s files, written or half-written


class DiskTier:
    """The files of disk-tier clusters that have no durable record (spill files), under one directory.

    Layout: ``<root>/<stream_id>/<cluster name>.safetensors``, where the cluster id is ``<stream_id>/<name>``. Nothing
    adopts them after a restart (only durable records come back), so ``KVTiers`` clears them as it starts. A stream's
    folder goes with its last spill file: streams come and go for months, and each would otherwise leave one.
    """

    SUFFIX = ".safetensors"

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, cluster_id: str) -> Path:
        return self.root / f"{cluster_id}{self.SUFFIX}"

    def write(self, cluster_id: str, kv: torch.Tensor) -> None:
        path = self.path(cluster_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_file({"kv": kv.contiguous().cpu()}, str(tmp))
            os.replace(tmp, path)  # a reader never sees half a file
        except BaseException:
            tmp.unlink(missing_ok=True)  # a disk that filled up mid-write keeps no half file
            raise

    def read(self, cluster_id: str) -> torch.Tensor:
        path = self.path(cluster_id)
        if not path.exists():
            raise UnknownClusterError(f"cluster {cluster_id!r} has no file in the disk tier at {self.root}")
        return load_file(str(path))["kv"]

    def delete(self, cluster_id: str) -> None:
        """Removes the cluster's spill file, if it has one (every cluster freed asks, most have none), and then its
        stream's folder if that is empty. Without a file nothing more is tried: an rmdir for every freed cluster took
        6.5 ms a second of the engine thread at 150 cameras (bench/NOTES.md, session 51)."""
        path = self.path(cluster_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _remove_if_empty(path.parent)

    def list_clusters(self, stream_id: str) -> list[str]:
        """The clusters of ``stream_id`` with a spill file, read from the directory itself."""
        names = (_SPILL_NAME.fullmatch(p.name) for p in (self.root / stream_id).glob("c*.safetensors"))
        return sorted(f"{stream_id}/{m[1]}" for m in names if m and not m[2])

    def clear(self) -> int:
        """Deletes every spill file (and half-written one) under the root, and nothing else: the directory may hold
        other files, such as durable records, so only names of the layout above (``<stream>/c<number>``, one folder
        down) go. Returns how many went."""
        paths = [p for p in self.root.glob("*/c*.safetensors*") if _SPILL_NAME.fullmatch(p.name)]
        for path in paths:
            path.unlink(missing_ok=True)
        for folder in {path.parent for path in paths}:
            _remove_if_empty(folder)
        return len(paths)


def _remove_if_empty(folder: Path) -> None:
    """Removes a stream's folder that holds nothing more; one that still does (another spill file, or a durable
    stream's files when the disk tier shares their directory) is left as it is."""
    with contextlib.suppress(OSError):  # not empty (or already gone)
        folder.rmdir()
