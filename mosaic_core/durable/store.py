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
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from mosaic_core.durable.checks import (
    KVShape,
    check_opened,
    check_summary,
    clean_state,
    clear_read_error,
    move_aside,
    note_read_error,
    read_failed_before,
    read_summary,
)
from mosaic_core.durable.manifest import (
    DAMAGED_PREFIX,
    RECORD_SUFFIX,
    STATE_NAME,
    ClusterEntry,
    ManifestState,
    ManifestWriter,
    fsync_dir,
    read_state,
    replay,
    write_atomic,
)
from mosaic_core.durable.records import (
    ClusterSummary,
    CorruptRecordError,
    decode_cluster,
    decode_pages,
    encode_pages,
    from_pages,
)
from mosaic_core.durable.retired import RetiredNumbers, numbers_given_out
from mosaic_core.durable.staging import StagingArena
from mosaic_core.errors import AlreadyExistsError, UnknownClusterError

log = logging.getLogger(__name__)
TRASH = ".trash"
NEW_PREFIX = ".new-"  # a stream's folder while ``create_stream`` builds it, renamed into place once whole
RETRY_S = (0.1, 0.5, 2.0, 5.0)  # pauses before the first retries of a failed write; the last repeats
FAILURES_PER_LOG = 12  # past the first few, one failed attempt in this many is logged (about one a minute)


@dataclass(slots=True)
class Seal:
    """A cluster handed to the writer: its manifest entry (checksum filled in on write) and KV snapshot."""

    entry: ClusterEntry
    # [P, L, 2, H, page_tokens, D] on the host (being filled until ``ready`` passes, under CUDA); None once the record
    # file holds them, which is then read instead
    pages: torch.Tensor | None
    summary: ClusterSummary
    ready: object = None  # torch.cuda.Event or None
    submitted_s: float = field(default_factory=time.monotonic)
    keyframes: bytes = b""  # JPEGs back to back, as ``entry.keyframes`` lists them
    written: Future | None = None  # its record file's write in the writer pool (queued again after a failure)
    num_bytes: int = field(init=False)  # the snapshot's

    def __post_init__(self) -> None:
        self.num_bytes = self.pages.numel() * self.pages.element_size()


@dataclass(slots=True)
class StoredStream:
    """One stream found on disk: what it was opened with, its clock and counters, its sealed clusters."""

    stream_id: str
    stream: dict
    state: dict
    clusters: list[ClusterEntry]
    next_cluster_number: int
    next_frame_index: int = 0  # frame indices below it may have been used (0: a journal from before they were kept)
    summaries: dict[str, ClusterSummary] = field(default_factory=dict)  # by cluster id, each of ``clusters``


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


@dataclass(slots=True)
class _Commit:
    stream_id: str
    add: list[Seal]
    remove: list[str]
    # The stream's journal when the commit was queued: a stream deleted and opened again under its id has another,
    # and the commit then belongs to neither.
    writer: ManifestWriter | None
    # Once, before its first try: a retry finds the removed clusters gone from the journal's state already.
    removed_files: list[str] | None = None
    journalled: bool = False  # its line is on disk: a retry only unlinks what it removed


class DurableStore:
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
        self._queue: deque[_Commit | Path] = deque()
        self._busy = False
        self._writers: dict[str, ManifestWriter] = {}
        self._pending: dict[str, Seal] = {}
        self._states: dict[str, dict] = {}
        self._dirty: set[str] = set()
        self._writing_states = False  # states taken off ``_dirty`` and not on disk yet
        self._state_failures = 0  # state writes that failed since the last that did not, for the log's pace
        self._stop = False
        self._files = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="durable-file")
        self._thread = threading.Thread(target=self._run, name="durable-writer", daemon=True)
        self._thread.start()

    # -- streams (engine thread) --------------------------------------------------------------------------
    def load_streams(self) -> list[StoredStream]:
        """Every stream under ``root`` that this version can restore, replayed from its manifest and checked whole;
        deletes crash leftovers (orphan files, temporary files, the trash). A stream that cannot be restored is set
        aside under ``.unreadable`` (its id free), logged and counted in ``stats``; one the disk fails to read is
        left where it is, for the next start, which sets aside the records that fail to read again and restores the
        rest (``checks``). Neither holds the others back."""
        shutil.rmtree(self.root / TRASH, ignore_errors=True)
        for unfinished in self.root.glob(f"{NEW_PREFIX}*"):  # a create a crash cut short: never acknowledged
            shutil.rmtree(unfinished, ignore_errors=True)
        found = []
        for stream_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                found.append(self._load_stream(stream_dir))
            except OSError as err:  # the disk, not the history: tried again at the next start
                log.error("stream %s is not restored: reading %s failed (%s); it is left as it is, and the next "
                          "start tries again", stream_dir.name, stream_dir, err)  # fmt: skip
            except Exception as err:  # anything this version cannot restore: that stream only
                self._set_aside(stream_dir, f"{type(err).__name__}: {err}")
        return found

    def _load_stream(self, stream_dir: Path) -> StoredStream:
        """One stream, checked whole before it is registered (so a stream that fails leaves nothing behind)."""
        manifest = replay(stream_dir)
        if not manifest.stream:
            raise ValueError("it has no readable manifest")
        stream_id = check_opened(manifest.stream, stream_dir.name, self.kv_shape)
        if manifest.unknown_fields:
            log.warning("stream %s: its journal has fields this version does not know (%s), written by a newer "
                        "version: ignored, and dropped when the journal is next compacted", stream_id,
                        ", ".join(sorted(manifest.unknown_fields)))  # fmt: skip
        summaries, unreadable, disk_errors = {}, [], 0
        expected = None if self.kv_shape is None else self.kv_shape.summary_shape  # else: the first record's
        failed_before = read_failed_before(stream_dir)
        for entry in manifest.clusters.values():
            try:
                summary = read_summary(stream_dir / entry.file)
            except OSError as err:
                if not isinstance(err, FileNotFoundError):  # the disk failed, not the record (``checks``)
                    if not failed_before:  # the whole stream is left for the next start, noted
                        note_read_error(stream_dir, entry.file, err)
                        raise
                    disk_errors += 1  # at the second start in a row: set aside, as a garbled record is
                unreadable.append((entry, err))
                continue
            except Exception as err:  # a missing or garbled file costs that cluster, not the stream
                unreadable.append((entry, err))
                continue
            expected = expected or tuple(summary.key_sum.shape)
            check_summary(summary, expected, entry.cluster_id)  # another model's KV sets the whole stream aside
            summaries[entry.cluster_id] = summary
        state = clean_state(read_state(stream_dir), stream_id)
        live = {entry.file for entry in manifest.clusters.values()}
        # A damaged journal may have named some of the files no line names now: they are kept, for a person.
        damaged = manifest.damaged_lines or any(stream_dir.glob(f"{DAMAGED_PREFIX}*"))
        if manifest.damaged_lines:
            log.error(
                "stream %s: %d damaged journal lines skipped in %s; the journal as it was and the record files "
                "no line names are kept in that folder", stream_id, manifest.damaged_lines, stream_dir,
            )  # fmt: skip
        for path in stream_dir.iterdir():
            orphan = path.suffix == RECORD_SUFFIX and path.name not in live
            if path.name.endswith(".tmp") or (orphan and not damaged):
                path.unlink(missing_ok=True)
        if disk_errors:
            log.error("stream %s: the disk failed to read its records at the last start, and %d of them again at "
                      "this one: those are set aside, and the rest of the stream is restored", stream_id,
                      disk_errors)  # fmt: skip
        for entry, err in unreadable:
            self._set_cluster_aside(stream_dir, entry, err)
        if failed_before:
            clear_read_error(stream_dir)
        with self._io:
            self._writers[stream_id] = ManifestWriter(stream_dir, manifest)
        with self._cv:
            self._states[stream_id] = dict(state)
        if unreadable:  # journalled out (retried like any commit), so neither the books nor compaction keep them
            self.submit(stream_id, remove=[entry.cluster_id for entry, _ in unreadable])
        return StoredStream(
            stream_id, dict(manifest.stream), state,
            [entry for entry in manifest.clusters.values() if entry.cluster_id in summaries],
            manifest.next_cluster_number, manifest.next_frame_index, summaries,
        )  # fmt: skip

    def _set_aside(self, stream_dir: Path, cause: str) -> None:
        """Moves a stream this version cannot restore out of its id's way, kept for a person, and counts it. Its
        numbers are retired first, as a deleted stream's are, so that a stream created again under its id numbers
        past every cluster and frame it may have named; where they cannot be, the folder stays, and holds the id."""
        try:
            if self.retired is not None:  # first: a crash in between leaves both, and the numbers' maximum is kept
                self.retired.retire(stream_dir.name, numbers_given_out(stream_dir))
            kept = move_aside(self.root, stream_dir, stream_dir.name)
        except OSError as err:
            log.error("stream %s cannot be restored (%s), nor its numbers retired and its folder moved aside (%s): "
                      "it is left in %s, and not served", stream_dir.name, cause, err, stream_dir)  # fmt: skip
            kept = stream_dir
        else:
            log.error("stream %s cannot be restored and is set aside: %s; its folder is kept as %s, and its stream "
                      "id is free", stream_dir.name, cause, kept)  # fmt: skip
        with self._cv:
            self.stats.streams_set_aside += 1
            self.stats.last_set_aside = f"stream {stream_dir.name} (kept as {kept}): {cause}"

    def _set_cluster_aside(self, stream_dir: Path, entry: ClusterEntry, err: Exception) -> None:
        """Moves the record of a cluster whose summary cannot be read under ``.unreadable`` (the caller journals
        the cluster out), and counts it."""
        path, kept = stream_dir / entry.file, "nowhere: it is missing"
        if path.exists():  # a failed move raises: the whole stream is left for the next start, the record with it
            kept = str(move_aside(self.root, path, f"{stream_dir.name}-{entry.file}"))
        log.error("cluster %s cannot be restored (%s): it leaves the stream's history; its record is kept %s",
                  entry.cluster_id, err, kept if kept.startswith("nowhere") else f"as {kept}")  # fmt: skip
        with self._cv:
            self.stats.clusters_set_aside += 1
            self.stats.last_set_aside = f"cluster {entry.cluster_id} (kept {kept}): {type(err).__name__}: {err}"

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
            stream_dir, target = self.stream_dir(stream_id), None
            if stream_dir.exists():
                trash = self.root / TRASH
                trash.mkdir(exist_ok=True)
                target = trash / f"{stream_id}-{uuid.uuid4().hex[:8]}"
                stream_dir.rename(target)
            self._forget(stream_id)
            if target is not None:
                try:
                    fsync_dir(self.root)
                except OSError as err:  # moved, and forgotten: only a crash before the disk syncs brings it back
                    log.error("stream %s moved to the trash, but syncing %s failed: %s", stream_id, self.root, err)
                self._enqueue(target)

    def leave(self, stream_id: str) -> None:
        """A loaded stream the engine could not open now (no room for its window): forgotten as a delete forgets
        it, its folder left where it is, whole, for a start with more room to restore."""
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

    def state(self, stream_id: str) -> dict:
        with self._cv:
            return dict(self._states.get(stream_id, {}))

    def stream_dir(self, stream_id: str) -> Path:
        return self.root / stream_id

    # -- clusters (engine thread) -------------------------------------------------------------------------
    def submit(self, stream_id: str, *, add: list[Seal] = (), remove: list[str] = ()) -> None:
        """Queues one commit: files for ``add`` are written, then one journal line, then ``remove``'s files
        are unlinked. Blocks while more than ``max_pending_bytes`` of snapshots wait."""
        commit = _Commit(stream_id, list(add), list(remove), self._writers.get(stream_id))
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
        return bool(self._queue or self._busy or self._dirty or self._writing_states)

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

    # -- writer thread ------------------------------------------------------------------------------------
    def _enqueue(self, op) -> None:
        with self._cv:
            self._queue.append(op)
            self._cv.notify_all()

    def _run(self) -> None:
        last_state_s = 0.0
        while True:
            with self._cv:
                while (
                    not self._queue
                    and not self._stop
                    and not (self._dirty and time.monotonic() - last_state_s >= self.state_interval_s)
                ):
                    self._cv.wait(self.state_interval_s / 2)
                if self._stop and not self._queue:
                    return
                op = self._queue[0] if self._queue else None
                self._busy = op is not None
            if op is not None:
                self._run_with_retry(op)
            if time.monotonic() - last_state_s >= self.state_interval_s or op is None:
                self._write_states()
                last_state_s = time.monotonic()

    def _run_with_retry(self, op) -> None:
        """Runs one queued op until it succeeds, its stream is deleted or the store closes: a failed write (disk
        full, an I/O error) is retried, the pause growing to the last of ``RETRY_S``, for as long as it fails.
        Meanwhile the commits behind it wait, and so, past ``max_pending_bytes``, does ``submit``: ingest is held
        back, and nothing sealed is dropped."""
        attempt = 0
        while True:
            try:
                if isinstance(op, Path):
                    shutil.rmtree(op, ignore_errors=True)  # in the trash: nothing else touches it
                else:
                    self._await_files(op)
                    with self._io:
                        if self._owned(op):
                            self._commit(op)
                        else:  # the stream was deleted meanwhile: its snapshots go with it, once no write reads them
                            wait_for_futures([seal.written for seal in op.add if seal.written is not None])
                            with self._cv:
                                for seal in op.add:
                                    self._forget_pending(seal)
                break
            except Exception as err:  # an OSError may pass; anything else must not end the writer either
                with self._cv:
                    self.stats.write_errors += 1
                    self.stats.last_error = f"{type(err).__name__}: {err}"
                if attempt < len(RETRY_S) or attempt % FAILURES_PER_LOG == 0:
                    log.error("durable write failed (attempt %d, retrying until it succeeds): %s", attempt + 1, err)
                if self._stop:
                    log.error("the store is closing: %s stays unwritten after %d attempts", op, attempt + 1)
                    break
                time.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])
                attempt += 1
        with self._cv:
            if self._queue and self._queue[0] is op:
                self._queue.popleft()
            self._busy = False
            self._cv.notify_all()

    def _write_record(self, stream_dir: Path, seal: Seal) -> None:
        """One record file, on disk before this returns (on a pool thread)."""
        started = time.monotonic()
        if seal.ready is not None:
            seal.ready.synchronize()
        chunks, checksum = encode_pages(seal.pages, seal.summary, keyframes=seal.keyframes)
        seal.entry.checksum = checksum
        write_atomic(stream_dir / seal.entry.file, chunks)
        with self._cv:
            self.stats.bytes_written += sum(memoryview(chunk).nbytes for chunk in chunks)
            self.stats.file_write_s += time.monotonic() - started
            self._let_go(seal)  # the file holds the bytes now, whenever the commit thread names it

    def _await_files(self, commit: _Commit) -> None:
        """Until the commit's record files are on disk. A failed write is queued again and its error raised, so
        the retry loop around this counts it and, after its pause, waits for the new write."""
        for seal in commit.add:
            try:
                seal.written.result()
            except Exception:  # a failed write, or one that deleting the stream cancelled
                with self._cv:  # ``delete_stream`` collects the writes to cancel under this lock
                    if not self._owned(commit):
                        return  # the stream was deleted meanwhile: its files are gone with it
                    seal.written = self._files.submit(self._write_record, self.stream_dir(commit.stream_id), seal)
                raise

    def _owned(self, commit: _Commit) -> bool:
        """Whether the journal the commit was queued for is still its stream's."""
        return self._current(commit.stream_id, commit.writer)

    def _current(self, stream_id: str, writer: ManifestWriter | None) -> bool:
        """Whether ``writer`` is still the stream's journal (not one of a stream deleted, or opened again)."""
        return writer is not None and self._writers.get(stream_id) is writer

    def _commit(self, commit: _Commit) -> None:
        """Journals one commit, then unlinks the files it removed; run again after a failure, it goes on from
        where that one stopped."""
        writer = commit.writer
        if commit.removed_files is None:
            commit.removed_files = [writer.state.clusters[c].file for c in commit.remove if c in writer.state.clusters]
        if not commit.journalled:
            entries = [asdict(seal.entry) for seal in commit.add]
            writer.append({"op": "commit", "add": entries, "remove": commit.remove})
            commit.journalled = True
        for name in commit.removed_files:
            (writer.stream_dir / name).unlink(missing_ok=True)
        now = time.monotonic()
        with self._cv:
            for seal in commit.add:
                latency = now - seal.submitted_s
                self.stats.clusters_written += 1
                self.stats.seal_to_durable_s_sum += latency
                self.stats.seal_to_durable_s_max = max(self.stats.seal_to_durable_s_max, latency)
                self._forget_pending(seal)

    def _forget_pending(self, seal: Seal) -> None:
        if self._pending.pop(seal.entry.cluster_id, None) is not None:
            self.stats.pending_clusters -= 1
            self._let_go(seal)

    def _let_go(self, seal: Seal) -> None:
        """Frees a snapshot's memory (its staging piece) and its bytes from the pending bound, once (under the lock)."""
        if seal.pages is None:
            return
        self.stats.pending_bytes -= seal.num_bytes
        if self.staging is not None and self.staging.owns(seal.pages):
            self.staging.give_back(seal.pages)
        seal.pages = None

    def _write_states(self) -> None:
        with self._cv:  # each state with its journal: a stream opened again under its id has another
            dirty = {
                sid: (dict(self._states[sid]), self._writers.get(sid)) for sid in self._dirty if sid in self._states
            }
            self._dirty.clear()
            self._writing_states = True
        for stream_id, (state, writer) in dirty.items():
            with self._io:
                if not self._current(stream_id, writer):
                    continue
                try:
                    write_atomic(self.stream_dir(stream_id) / STATE_NAME, _json_bytes(state))
                    self._state_failures = 0
                except Exception as err:  # an OSError, or anything else, must not end the writer
                    with self._cv:  # counted, and written again at the next interval (the newest state then)
                        self.stats.write_errors += 1
                        self.stats.last_error = f"{type(err).__name__}: {err}"
                        self._dirty.add(stream_id)
                        self._state_failures += 1
                        failures = self._state_failures
                    if failures <= len(RETRY_S) or failures % FAILURES_PER_LOG == 0:
                        log.error("could not write the state of stream %s (failure %d, retried): %s", stream_id,
                                  failures, err)  # fmt: skip
        with self._cv:
            self._writing_states = False
            self._cv.notify_all()


def _json_bytes(value: dict) -> bytes:
    return json.dumps(value, sort_keys=True).encode()


def _stream_of(cluster_id: str) -> str:
    return cluster_id.rsplit("/", 1)[0]


def _belongs(op, stream_id: str) -> bool:
    return isinstance(op, _Commit) and op.stream_id == stream_id
