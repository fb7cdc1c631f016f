"""How ``DurableStore`` finds its streams again after a restart, and sets aside the ones it cannot restore.

``load_streams`` checks each stream whole before it registers it (``checks``): one this version cannot restore is
set aside under ``.unreadable`` and counted, its numbers retired as a deleted stream's are (``retired``), and the
others come back all the same. ``StreamLoadingMixin`` is mixed into ``DurableStore``: it registers what it loads in the
store's journals and states, under the store's locks, and counts what it sets aside in the store's stats.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
    ClusterEntry,
    ManifestState,
    ManifestWriter,
    fsync_dir,
    read_state,
    replay,
)
from mosaic_core.durable.progress import RestoreProgress
from mosaic_core.durable.records import ClusterSummary
from mosaic_core.durable.retired import numbers_given_out

log = logging.getLogger(__name__)
TRASH = ".trash"
# Why a stream found at this start stays in its folder, under its id, unserved until a start that restores it
# (``DurableStats.streams_left``): the device had no room for its window (``DurableStore.leave``), the disk failed to
# read it, this version cannot restore it and its folder could not be moved aside either, or the engine's caller
# refused what it stored with the stream (``meta``).
LEFT_REASONS = ("no_room", "read_failed", "not_moved", "record_refused")
NEW_PREFIX = ".new-"  # a stream's folder while ``create_stream`` builds it, renamed into place once whole


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

    @property
    def num_bytes(self) -> int:
        """The bytes of its clusters' records: their KV and keyframes."""
        return sum(e.num_bytes + sum(k["num_bytes"] for k in e.keyframes) for e in self.clusters)


def move_to_trash(root: Path, stream_dir: Path) -> Path:
    """Moves ``stream_dir``, a stream's folder under ``root``, into ``root``'s trash in one rename and syncs ``root``;
    returns where it went. A sync that fails is logged: the move stands, and only a crash before the disk syncs
    brings the folder back. The trash is emptied in the background or at the next start.

    Raises:
        OSError: the move failed (a full or failing volume); nothing moved.
    """
    trash = root / TRASH
    trash.mkdir(exist_ok=True)
    target = trash / f"{stream_dir.name}-{uuid.uuid4().hex[:8]}"
    stream_dir.rename(target)
    try:
        fsync_dir(root)
    except OSError as err:
        log.error("stream %s moved to the trash, but syncing %s failed: %s", stream_dir.name, root, err)
    return target


class StreamLoadingMixin:
    """The restart half of ``DurableStore`` (module doc); the store's ``__init__`` sets up what it uses."""

    def load_streams(self, on_progress: Callable[[RestoreProgress], None] | None = None) -> list[StoredStream]:
        """Every stream under ``root`` that this version can restore, replayed from its manifest and checked whole;
        deletes crash leftovers (orphan files, temporary files, the trash). A stream that cannot be restored is set
        aside under ``.unreadable`` (its id free), logged and counted in ``stats``; one the disk fails to read is
        left where it is, for the next start, which sets aside the records that fail to read again and restores the
        rest (``checks``), and counted in ``stats.streams_left``. Neither holds the others back. ``on_progress`` watches
        each stream read (``RestoreProgress``)."""
        shutil.rmtree(self.root / TRASH, ignore_errors=True)
        for unfinished in self.root.glob(f"{NEW_PREFIX}*"):  # a create a crash cut short: never acknowledged
            shutil.rmtree(unfinished, ignore_errors=True)
        found = []
        stream_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        progress = RestoreProgress("reading streams", len(stream_dirs), on_progress)
        for stream_dir in stream_dirs:
            stored = None
            try:
                stored = self._load_stream(stream_dir)
            except OSError as err:  # the disk, not the history: tried again at the next start
                log.error("stream %s is not restored: reading %s failed (%s); it is left as it is, and the next "
                          "start tries again", stream_dir.name, stream_dir, err)  # fmt: skip
                self._count_left("read_failed")
            except Exception as err:  # anything this version cannot restore: that stream only
                self._set_aside(stream_dir, f"{type(err).__name__}: {err}")
            if stored is not None:
                found.append(stored)
                progress.step(num_records=len(stored.clusters), num_bytes=stored.num_bytes)
            else:
                progress.step()
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
        failed_before = read_failed_before(stream_dir)
        summaries, unreadable, disk_errors = _read_summaries(stream_dir, manifest, self.kv_shape, failed_before)
        state = clean_state(read_state(stream_dir), stream_id)
        _remove_leftovers(stream_dir, manifest, stream_id)
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
            self._count_left("not_moved")
        else:
            log.error("stream %s cannot be restored and is set aside: %s; its folder is kept as %s, and its stream "
                      "id is free", stream_dir.name, cause, kept)  # fmt: skip
        with self._cv:
            self.stats.streams_set_aside += 1
            self.stats.last_set_aside = f"stream {stream_dir.name} (kept as {kept}): {cause}"

    def _count_left(self, reason: str) -> None:
        """Counts a stream found at this start that stays in its folder, unserved (``LEFT_REASONS``)."""
        if reason not in LEFT_REASONS:
            raise ValueError(f"unknown reason {reason!r} for a stream left unserved; one of {', '.join(LEFT_REASONS)}")
        with self._cv:
            self.stats.streams_left[reason] = self.stats.streams_left.get(reason, 0) + 1

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


def _read_summaries(
    stream_dir: Path, manifest: ManifestState, kv_shape: KVShape | None, failed_before: bool
) -> tuple[dict[str, ClusterSummary], list[tuple[ClusterEntry, Exception]], int]:
    """The summaries of a stream's clusters, the clusters whose summary cannot be read (with why), and how many of
    those the disk failed to read a second start in a row. The disk failing at a first start raises: the whole
    stream is left for the next start, noted (``checks``)."""
    summaries, unreadable, disk_errors = {}, [], 0
    expected = None if kv_shape is None else kv_shape.summary_shape  # else: the first record's
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
    return summaries, unreadable, disk_errors


def _remove_leftovers(stream_dir: Path, manifest: ManifestState, stream_id: str) -> None:
    """Removes a stream's unfinished writes, and its record files no journal line names unless the journal is
    damaged."""
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
