"""Writes sealed clusters behind to disk, off the engine thread, and finds them again after a restart.

The engine thread only hands over work: ``submit`` queues a commit (clusters to add, with host snapshots of
their KV, and clusters to remove) and returns. Record files are written by a pool of ``writers`` threads as soon
as their commit is queued (the checksum, the write and the fsync of one file are independent of every other
file), and one commit thread runs the queue in order, appending each commit's journal line once its files are on
disk:

    engine thread:  seal c12 -> submit(add c12)      merge c12+c13 -> submit(add c14, remove c12 c13)
    file writers:   write c12.mkv (tmp, fsync, rename)     write c14.mkv (tmp, fsync, rename)
    commit thread:  wait c12.mkv ; journal line ; ... wait c14.mkv ; journal line ; unlink c12.mkv c13.mkv

Because the queue is FIFO, a removal always follows the write it undoes, and a journal line is appended only
after the files it names are on disk. Cluster ids are never reused, so files written side by side never share a
name. Until its line is written a cluster is "pending": reads are served from its snapshot until its file is
written, and from the file after that. A snapshot's memory is freed as soon as its file is written, without
waiting for the commit thread, so a slow journal never holds snapshots back. Snapshot bytes not yet in their
files are bounded (``max_pending_bytes``); past that, ``submit`` waits for the writers, which holds ingest back
rather than dropping history. With a ``staging`` arena (pinned host memory, under CUDA) the snapshots live in it and
go back to it once written; a read of a pending snapshot gets a copy, since the arena reuses the memory after that.

Deleting a stream is synchronous and atomic: its directory is renamed into ``.trash`` (then removed in the
background), so a crash right after a delete never brings the stream back.

``load_streams`` checks each stream whole before it registers it (``checks``): one this version cannot restore is
set aside under ``.unreadable`` and counted, its numbers retired as a deleted stream's are (``retired``), and the
others come back all the same.

The writer pool and the commit thread are ``write_behind``'s, and ``load_streams`` is ``loading``'s: both are mixed
into ``DurableStore``, which holds the state they share.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from mosaic_core.durable.checks import KVShape
from mosaic_core.durable.loading import NEW_PREFIX, StreamLoadingMixin, move_to_trash
from mosaic_core.durable.manifest import (
    STATE_NAME,
    ClusterEntry,
    ManifestState,
    ManifestWriter,
    fsync_dir,
    write_atomic,
)
from mosaic_core.durable.records import ClusterSummary, CorruptRecordError, decode_cluster, decode_pages, from_pages
from mosaic_core.durable.retired import RetiredNumbers
from mosaic_core.durable.staging import StagingArena
from mosaic_core.durable.write_behind import Commit, Seal, WriteBehindMixin, json_bytes
from mosaic_core.errors import AlreadyExistsError, UnknownClusterError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DurableStats:
    clusters_written: int = 0
    bytes_written: int = 0
    write_errors: int = 0
    last_error: str = ""
    pending_clusters: int = 0
    pending_bytes: int = 0
    oldest_pending_s: float = 0.0
    seal_to_durable_s_sum: float = 0.0
    seal_to_durable_s_max: float = 0.0
    submit_wait_s: float = 0.0  # the engine thread's time blocked in ``submit`` by ``max_pending_bytes``
    staging_wait_s: float = 0.0  # the engine thread's time waiting for room in the staging arena
    file_write_s: float = 0.0  # the writer pool's time in record files (checksum, write, fsync), summed over threads
    writers: int = 0  # the writer pool's threads: file_write_s grows by at most this many seconds a second
    streams_set_aside: int = 0  # streams a restart could not restore, moved under ``.unreadable`` (``checks``)
    clusters_set_aside: int = 0  # records whose summary a restart could not read, moved there and journalled out
    last_set_aside: str = ""  # what the last of either was, and why
    # Streams found at this start and left in their folders, unserved until a start restores them, by reason
    # (``loading.LEFT_REASONS``); each holds its id meanwhile.
    streams_left: dict[str, int] = field(default_factory=dict)


class DurableStore(StreamLoadingMixin, WriteBehindMixin):
    """The cluster records and manifests of one engine, under ``root`` (one directory per stream).

    Args:
        root: the engine's data directory; created if missing.
        max_pending_bytes: snapshot bytes that may wait for their files before ``submit`` blocks.
        state_interval_s: how often a changed stream state (clock, counters) is written.
        writers: threads that write record files side by side.
        staging: host memory that snapshots are taken from and given back to (module doc), or None.
        kv_shape: the engine's KV geometry: recorded with each stream it creates, and a restart sets aside a stream
            of another (None: neither).
        retired: where the numbers of a stream set aside are retired (``mosaic_core.durable.retired``), or None.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        max_pending_bytes: int = 1 << 30,
        state_interval_s: float = 1.0,
        writers: int = 4,
        staging: StagingArena | None = None,
        kv_shape: KVShape | None = None,
        retired: RetiredNumbers | None = None,
    ) -> None:
        if writers < 1:
            raise ValueError(f"a durable store needs at least one writer thread, got {writers}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_pending_bytes = max_pending_bytes
        self.state_interval_s = state_interval_s
        self.staging = staging
        self.kv_shape = kv_shape
        self.retired = retired
        self.stats = DurableStats(writers=writers)
        self._cv = threading.Condition()
        self._io = threading.Lock()  # held by the writer for a whole commit, and by stream create/delete
        self._queue: deque[Commit | Path] = deque()
        self._busy = False
        self._writers: dict[str, ManifestWriter] = {}
        self._pending: dict[str, Seal] = {}
        self._states: dict[str, dict] = {}
        self._dirty: set[str] = set()
        self._writing_states = False  # states taken off ``_dirty`` and not on disk yet
        self._emptying = 0  # callers of ``empty_trash`` removing folders they took off the queue
        self._state_failures = 0  # state writes that failed since the last that did not, for the log's pace
        self._stop = False
        self._files = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="durable-file")
        self._thread = threading.Thread(target=self._run, name="durable-writer", daemon=True)
        self._thread.start()

    # -- streams (engine thread) --------------------------------------------------------------------------
    def create_stream(self, stream_id: str, stream: dict) -> None:
        """Makes the stream's directory and manifest, durably, before the stream takes frames: built under a hidden
        name and renamed into place whole, so a crash midway leaves nothing under the stream's id."""
        stream_dir = self.stream_dir(stream_id)
        with self._io:
            if stream_id in self._writers or stream_dir.exists():
                raise AlreadyExistsError(f"stream {stream_id!r} already has history in {self.root}")
            building = self.root / f"{NEW_PREFIX}{stream_id}-{uuid.uuid4().hex[:8]}"
            building.mkdir(parents=True)
            opened = ManifestWriter(building, ManifestState())
            kv = {} if self.kv_shape is None else {"kv": self.kv_shape.to_json()}  # checked at a restart
            opened.append({"op": "open", "stream": {**stream, **kv, "stream_id": stream_id}})
            fsync_dir(building)
            building.rename(stream_dir)
            fsync_dir(self.root)
            self._writers[stream_id] = ManifestWriter(stream_dir, opened.state)
        with self._cv:
            self._states[stream_id] = {}

    def delete_stream(self, stream_id: str) -> None:
        """Forgets the stream at once and for good: its directory moves to the trash in one rename. When the move
        fails (a full volume), nothing is forgotten: the stream goes on being written, and a retry deletes it."""
        with self._io:
            stream_dir = self.stream_dir(stream_id)
            target = move_to_trash(self.root, stream_dir) if stream_dir.exists() else None
            self._forget(stream_id)
            if target is not None:
                self._enqueue(target)

    def leave(self, stream_id: str, reason: str | None) -> None:
        """A stream the engine does not serve: forgotten as a delete forgets it, its folder left where it is, whole,
        for a later start to restore. ``reason`` (one of ``loading.LEFT_REASONS``) counts a loaded stream in
        ``stats.streams_left``; None counts nothing (a stream that failed to open)."""
        if reason is not None:
            self._count_left(reason)  # first: an unknown reason raises before anything is forgotten
        with self._io:
            self._forget(stream_id)

    def set_aside(self, stream_id: str, cause: str) -> None:
        """A loaded stream the engine could not adopt (a failure the checks of ``load_streams`` did not foresee):
        forgotten as a delete forgets it, its folder kept under ``.unreadable`` and counted as one that fails them."""
        with self._io:
            stream_dir = self._forget(stream_id)
        self._set_aside(stream_dir, cause)

    def _forget(self, stream_id: str) -> Path:
        """Drops the stream's writer, queued commits, pending snapshots and state (call with ``_io`` held); returns
        its folder, left where it is."""
        self._writers.pop(stream_id, None)
        with self._cv:
            writes = [seal.written for op in self._queue if _belongs(op, stream_id) for seal in op.add]
            self._queue = deque(op for op in self._queue if not _belongs(op, stream_id))
            dropped = [seal for cluster_id, seal in self._pending.items() if _stream_of(cluster_id) == stream_id]
            self._states.pop(stream_id, None)
            self._dirty.discard(stream_id)
        for written in writes:  # no file of the old stream may land in a new stream's directory of that name
            written.cancel()
        wait_for_futures(writes)
        with self._cv:  # only now: a write under way still read its snapshot
            for seal in dropped:
                self._forget_pending(seal)
        return self.stream_dir(stream_id)

    def reserve_ids(self, stream_id: str, next_number: int, next_frame_index: int) -> None:
        """Records, durably, that cluster numbers below ``next_number`` and frame indices below ``next_frame_index``
        may be in use (never reused)."""
        with self._io:
            self._writers[stream_id].append({"op": "ids", "next": next_number, "frames": next_frame_index})

    def update_state(self, stream_id: str, **fields) -> None:
        """Merges clock or counter fields into the stream's state; written within ``state_interval_s``."""
        with self._cv:
            if stream_id in self._states:
                self._states[stream_id].update(fields)
                self._dirty.add(stream_id)

    def write_state(self, stream_id: str, **fields) -> None:
        """Merges ``fields`` into the stream's state as ``update_state`` does, and writes the state before returning:
        for a field a restart must find even after a crash within ``state_interval_s``. A stream this store does
        not hold (deleted meanwhile) writes nothing.

        Raises:
            OSError: the write failed; the state is written again at the writer's next pass.
        """
        with self._io:  # the writer takes each state as it writes it, under this lock: it never writes an older one
            with self._cv:
                if stream_id not in self._states:
                    return
                self._states[stream_id].update(fields)
                state = dict(self._states[stream_id])
            try:
                write_atomic(self.stream_dir(stream_id) / STATE_NAME, json_bytes(state))
            except OSError:
                with self._cv:
                    self._dirty.add(stream_id)
                raise

    def state(self, stream_id: str) -> dict:
        with self._cv:
            return dict(self._states.get(stream_id, {}))

    def stream_dir(self, stream_id: str) -> Path:
        return self.root / stream_id

    # -- clusters (engine thread) -------------------------------------------------------------------------
    def submit(self, stream_id: str, *, add: list[Seal] = (), remove: list[str] = ()) -> None:
        """Queues one commit: files for ``add`` are written, then one journal line, then ``remove``'s files
        are unlinked. Blocks while more than ``max_pending_bytes`` of snapshots wait."""
        commit = Commit(stream_id, list(add), list(remove), self._writers.get(stream_id))
        for seal in commit.add:  # the writers give their staging pieces back: room a later snapshot may wait for
            if self.staging is not None and self.staging.owns(seal.pages):
                self.staging.hand_over(seal.pages)
        with self._cv:
            if self.stats.pending_bytes > self.max_pending_bytes and not self._stop:
                blocked = time.monotonic()
                while self.stats.pending_bytes > self.max_pending_bytes and not self._stop:
                    self._cv.wait(0.5)
                self.stats.submit_wait_s += time.monotonic() - blocked
            for seal in commit.add:
                self._pending[seal.entry.cluster_id] = seal
                self.stats.pending_clusters += 1
                self.stats.pending_bytes += seal.num_bytes
            stream_dir = self.stream_dir(stream_id)
            for seal in commit.add:  # under the lock, so the commit thread never sees a seal without its write
                seal.written = self._files.submit(self._write_record, stream_dir, seal)
            self._queue.append(commit)
            self._cv.notify_all()

    def owns(self, cluster_id: str) -> bool:
        """Whether the cluster is durable or on its way (its bytes can always be read from here)."""
        if cluster_id in self._pending:
            return True
        writer = self._writers.get(_stream_of(cluster_id))
        return writer is not None and cluster_id in writer.state.clusters

    def entry(self, cluster_id: str) -> ClusterEntry:
        seal = self._pending.get(cluster_id)
        if seal is not None:
            return seal.entry
        writer = self._writers.get(_stream_of(cluster_id))
        if writer is None or cluster_id not in writer.state.clusters:
            raise UnknownClusterError(f"cluster {cluster_id!r} has no durable record")
        return writer.state.clusters[cluster_id]

    def read_kv(self, cluster_id: str) -> torch.Tensor:
        """The cluster's KV ``[L, 2, H, n, D]`` on the host: its snapshot while pending, else its file
        (checked against the manifest's checksum)."""
        seal = self._pending.get(cluster_id)
        if seal is not None:
            return from_pages(self._pending_pages(seal))
        entry = self.entry(cluster_id)
        path = self.stream_dir(_stream_of(cluster_id)) / entry.file
        kv, _ = decode_cluster(path.read_bytes(), expect_checksum=entry.checksum, name=str(path))
        return kv

    def read_pages(self, cluster_id: str) -> torch.Tensor:
        """The cluster's record pages ``[P, L, 2, H, page_tokens, D]`` on the host (one page per frame), as its file
        holds them (checked against the manifest's checksum), or made from its snapshot while pending."""
        seal = self._pending.get(cluster_id)
        if seal is not None:
            return self._pending_pages(seal)
        entry = self.entry(cluster_id)
        path = self.stream_dir(_stream_of(cluster_id)) / entry.file
        return decode_pages(path.read_bytes(), expect_checksum=entry.checksum, name=str(path))[0]

    def _pending_pages(self, seal: Seal) -> torch.Tensor:
        """A pending snapshot's pages once filled (a copy when they live in the staging arena, which reuses them once
        the record file is written), or, once it is written, the file's (checked against its checksum)."""
        if seal.ready is not None:
            seal.ready.synchronize()
        with self._cv:  # the writer that gives the snapshot back takes this lock first
            if seal.pages is not None:
                return seal.pages.clone() if self.staging is not None and self.staging.owns(seal.pages) else seal.pages
        path = self.stream_dir(_stream_of(seal.entry.cluster_id)) / seal.entry.file
        return decode_pages(path.read_bytes(), expect_checksum=seal.entry.checksum, name=str(path))[0]

    def read_keyframes(self, stream_id: str, entry: ClusterEntry) -> list[bytes]:
        """The JPEG bytes of a durable cluster's keyframes, in ``entry.keyframes`` order (a read of that one
        tensor of the record; the KV pages are not read)."""
        if not entry.keyframes:
            return []
        path = self.stream_dir(stream_id) / entry.file
        with safe_open(str(path), framework="pt") as f:
            data = f.get_tensor("keyframes").numpy().tobytes()
        sizes = [int(k["num_bytes"]) for k in entry.keyframes]
        if sum(sizes) != len(data):
            raise CorruptRecordError(f"cluster record {path} holds {len(data)} keyframe bytes, not {sum(sizes)}")
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        jpegs = [data[o : o + n] for o, n in zip(offsets, sizes, strict=True)]
        for meta, jpeg in zip(entry.keyframes, jpegs, strict=True):
            if "crc32" in meta and zlib.crc32(jpeg) != int(meta["crc32"]):  # records before the CRC have none
                raise CorruptRecordError(
                    f"cluster record {path}: keyframe of frame {meta['frame_index']} fails its CRC"
                )
        return jpegs

    def read_summary(self, cluster_id: str) -> ClusterSummary:
        entry = self.entry(cluster_id)
        path = self.stream_dir(_stream_of(cluster_id)) / entry.file
        return decode_cluster(path.read_bytes(), expect_checksum=entry.checksum, name=str(path))[1]

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Waits until every queued commit and changed state is on disk; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            self._cv.notify_all()
            while self._unwritten() and time.monotonic() < deadline:
                self._cv.wait(0.05)
            return not self._unwritten()

    def _unwritten(self) -> bool:
        return bool(self._queue or self._busy or self._dirty or self._writing_states or self._emptying)

    def close(self, timeout_s: float = 60.0) -> None:
        self.flush(timeout_s)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout_s)
        self._files.shutdown(wait=False, cancel_futures=True)

    def snapshot_stats(self) -> DurableStats:
        with self._cv:
            stats = DurableStats(**asdict(self.stats))
            if self._pending:
                stats.oldest_pending_s = time.monotonic() - min(s.submitted_s for s in self._pending.values())
        if self.staging is not None:
            stats.staging_wait_s = self.staging.wait_s
        return stats


def _stream_of(cluster_id: str) -> str:
    return cluster_id.rsplit("/", 1)[0]


def _belongs(op, stream_id: str) -> bool:
    return isinstance(op, Commit) and op.stream_id == stream_id
