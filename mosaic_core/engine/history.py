"""Durable camera history for the engine: sealed clusters go to record files, and come back after a restart.

A cluster becomes durable once it is sealed *and* its last frame has left the local window: only then is its KV
complete and immutable. So a crash loses at most the open cluster, the frames still in the local window and the
commits the writer has not finished (``DurableStore.snapshot_stats``), all of them recent video.

    ingest: frame leaves the window -> appended to c12 -> c12 sealed and complete -> Seal(c12) -> DurableStore
    restart: DurableStore.load_streams -> sink prefilled again -> c0..c12 adopted into the disk tier

Cluster numbers and frame indices (which name keyframes) are handed out in blocks recorded in the manifest before
any is used, so a restarted stream never reuses an id, even one of a cluster that was open, or of a frame that was
not yet sealed into a cluster, when the process died. A stream opened under the id of a deleted one numbers on past
it (``mosaic_core.durable.retired``): its journal's first line keeps the cluster number and frame index it starts
at, so a restart goes on past both, even if the first reservation was never written.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass

from mosaic_core.bookkeeping.cluster_record import ClusterRecord
from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.durable.loading import StoredStream
from mosaic_core.durable.manifest import RECORD_SUFFIX, ClusterEntry
from mosaic_core.durable.records import ClusterSummary
from mosaic_core.durable.store import DurableStore
from mosaic_core.durable.write_behind import Seal
from mosaic_core.engine.keyframe_store import KeyframeSettings, held_keyframes, keyframes_of
from mosaic_core.engine.keyframes import Keyframe, make_keyframe_id
from mosaic_core.engine.record_ledger import RecordLedger
from mosaic_core.engine.stream import StreamState
from mosaic_core.engine.tiering import TierManager

log = logging.getLogger(__name__)
ID_BLOCK = 64
FRAME_ID_BLOCK = 1024


@dataclass(slots=True)
class RestoredStream:
    """A stream brought back from disk: what its opener stored with it, its saved state, its history."""

    stream_id: str
    meta: dict
    state: dict
    num_clusters: int
    last_timestamp_s: float | None  # the newest frame time the stream gave out: a new frame comes after it
    # The newest frame time of its sealed clusters: the history a crash left (the frames after it, up to
    # ``last_timestamp_s``, were in its window or open cluster); None with no sealed cluster.
    last_sealed_s: float | None = None


class HistoryKeeper:
    """Writes one engine's sealed clusters behind and re-adopts them after a restart."""

    def __init__(self, store: DurableStore, tiering: TierManager, keyframes: KeyframeSettings) -> None:
        self.store = store
        self.tiering = tiering
        self.keyframes = keyframes
        # stream -> (cluster numbers, frame indices) below these are recorded as possibly used
        self._reserved: dict[str, tuple[int, int]] = {}
        self.snapshot_s = 0.0  # the engine thread's time queuing snapshots (waits for staging room included)
        self.ledger = RecordLedger()  # the records' KV and keyframe bytes (headers and summaries aside)
        self.dropped_for_space = 0  # clusters the engine dropped to keep history_budget_bytes

    # -- lifecycle ----------------------------------------------------------------------------------------
    def create(self, state: StreamState, *, system_prompt: str | None, meta: dict) -> None:
        opened = {"fps": state.fps, "system_prompt": system_prompt, "meta": meta}
        numbering = {"first_frame_index": state.first_frame_index, "first_cluster_number": state.former.next_number}
        self.store.create_stream(state.stream_id, {**opened, **numbering})
        self._reserved[state.stream_id] = (0, 0)
        try:
            self.ensure_ids(state)
        except BaseException:
            # The open fails, so its folder goes too: kept, it would refuse the id as existing, come back at the
            # next restart as a stream no one created, and keep its writer and reservation here meanwhile.
            try:
                self.close(state.stream_id)
            except OSError as err:
                self._forget_unremovable(state.stream_id, err)
            raise

    def _forget_unremovable(self, stream_id: str, err: OSError) -> None:
        """A failed open whose folder cannot be moved away either: its writer and reservation go all the same, so
        the engine holds nothing of it; the folder stays, and a restart restores it as an empty stream."""
        self.store.leave(stream_id, None)
        self._forget_ids_and_bytes(stream_id)
        log.error(
            "stream %s failed to open, and its folder could not be removed (%s): a restart restores it empty",
            stream_id,
            err,
        )

    def close(self, stream_id: str) -> None:
        self.store.delete_stream(stream_id)
        self._forget_ids_and_bytes(stream_id)

    def _forget_ids_and_bytes(self, stream_id: str) -> None:
        self._reserved.pop(stream_id, None)
        self.ledger.forget_stream(stream_id)

    # -- ingest and maintenance ---------------------------------------------------------------------------
    def ensure_ids(self, state: StreamState, *, frames: int = 0, clusters: int = 0) -> None:
        """Makes sure the ids the stream may give out next are reserved in its journal before any is seen anywhere
        else: its next ``frames`` frame indices and ``clusters`` cluster numbers, past those taken so far. An
        ingest call reserves for all of its frames, each of which may open a cluster, before it changes anything (a
        failed journal write then fails the call whole); a merge, a join or a split reserves its new clusters'
        numbers the same way, before the former takes them."""
        numbers_needed = state.former.next_number + clusters
        frames_needed = state.next_frame_index + frames
        numbers, reserved_frames = self._reserved[state.stream_id]
        if numbers_needed < numbers and frames_needed < reserved_frames:
            return
        if numbers_needed >= numbers:
            numbers = numbers_needed + ID_BLOCK
        if frames_needed >= reserved_frames:
            reserved_frames = frames_needed + FRAME_ID_BLOCK
        self.store.reserve_ids(state.stream_id, numbers, reserved_frames)
        self._reserved[state.stream_id] = (numbers, reserved_frames)

    def on_completed(self, state: StreamState, record: ClusterRecord) -> None:
        """A sealed cluster's last frame has left the local window into its KV: the cluster is complete, persist
        it. ``record`` is the former's own (read, not changed)."""
        self._submit(state, [self._seal(state, record)], [])

    def on_merge(self, state: StreamState, merged_id: str, removed_ids: list[str]) -> None:
        self._submit(state, [self._seal(state, state.former.get(merged_id))], removed_ids)

    def on_split(self, state: StreamState, new_ids: list[str], removed_id: str) -> None:
        self._submit(state, [self._seal(state, state.former.get(cid)) for cid in new_ids], [removed_id])

    def on_drop(self, state: StreamState, cluster_ids: list[str]) -> None:
        if cluster_ids:
            self._submit(state, [], cluster_ids)

    def _submit(self, state: StreamState, seals: list[Seal], removed_ids: list[str]) -> None:
        """Queues the commit, and enters its records in the ledger as old as the oldest record they replace (a
        merge, a split), else as of now. A new record's cluster that had a spill file loses it (best effort: the
        record holds the bytes from now on, so a file that will not go is only wasted space)."""
        replaced = [t for cid in removed_ids if (t := self.ledger.sealed_unix_s(cid)) is not None]
        sealed_unix_s = min(replaced, default=time.time())
        for seal in seals:  # kept in the journal, so that a restart ranks it as this engine did
            seal.entry.sealed_unix_s = sealed_unix_s
        self.store.submit(state.stream_id, add=seals, remove=removed_ids)
        self.ledger.remove(removed_ids)
        for seal in seals:
            num_bytes = seal.entry.num_bytes + len(seal.keyframes)
            self.ledger.add(state.stream_id, seal.entry.cluster_id, sealed_unix_s=sealed_unix_s, num_bytes=num_bytes)
        for seal in seals:
            try:
                self.tiering.tiers.drop_spill(seal.entry.cluster_id)
            except OSError as err:
                log.warning("stream %s: the spill file of %s, now durable, stays: %s", state.stream_id,
                            seal.entry.cluster_id, err)  # fmt: skip

    def note_progress(self, state: StreamState) -> None:
        self.store.update_state(
            state.stream_id,
            first_timestamp_s=state.first_timestamp_s,
            last_timestamp_s=state.last_timestamp_s,
            frames_ingested=state.frames_ingested,
            text_cursor=state.text_cursor,
        )

    def _seal(self, state: StreamState, record: ClusterRecord) -> Seal:
        started = time.perf_counter()
        try:
            return self._snapshot(state, record)
        finally:
            self.snapshot_s += time.perf_counter() - started

    def _snapshot(self, state: StreamState, record: ClusterRecord) -> Seal:
        tiers = self.tiering.tiers
        page_tokens = record.frame_num_tokens[0]
        assert all(n == page_tokens for n in record.frame_num_tokens), f"{record.cluster_id}: unequal frame sizes"
        pages, ready = tiers.snapshot_pages(record.cluster_id, page_tokens, self.store.staging)
        stats, count = self.tiering.summaries.stats_copy(record.cluster_id)
        if stats.is_cuda:  # queued on the side stream after the pages' copy, so its event covers both
            stats, moved = tiers.transfers.to_host(stats, pin=True)
            ready = moved.ready
        entry = ClusterEntry(
            cluster_id=record.cluster_id,
            file=record.cluster_id.rsplit("/", 1)[1] + RECORD_SUFFIX,
            start_s=record.start_s,
            end_s=record.end_s,
            frame_indices=list(record.frame_indices),
            frame_timestamps_s=list(record.frame_timestamps_s),
            frame_num_tokens=list(record.frame_num_tokens),
            num_bytes=pages.numel() * pages.element_size(),
            checksum="",
            position_end=state.text_cursor,
        )
        store = held_keyframes(state)
        keyframes = [] if store is None else store.of_cluster(record.cluster_id)
        entry.keyframes = [
            {"frame_index": k.frame_index, "timestamp_s": k.timestamp_s, "width": k.width, "height": k.height,
             "num_bytes": k.num_bytes, "crc32": zlib.crc32(k.jpeg)}
            for k in keyframes
        ]  # fmt: skip
        summary = ClusterSummary(stats[0], stats[1], count)
        return Seal(entry, pages, summary, ready, keyframes=b"".join(k.jpeg for k in keyframes))

    # -- restart ------------------------------------------------------------------------------------------
    def adopt(self, state: StreamState, stored: StoredStream) -> RestoredStream:
        """Gives a freshly opened stream (sink prefilled, empty window) its history back from disk. ``stored`` is
        checked whole already (``DurableStore.load_streams``): its clusters' summaries are read, and of this
        model's shape."""
        summaries = stored.summaries
        entries = sorted(stored.clusters, key=lambda e: (e.start_s, e.cluster_id))
        saved = stored.state
        last_ts = _max(saved.get("last_timestamp_s"), *(e.end_s for e in entries))
        first_frame_index, frames_ingested, next_frame_index = _restored_frame_counts(stored, entries)
        records = _sealed_records(state.stream_id, entries)
        # the first line's start too: the reservation after it may never have been written (a crash, a full disk)
        next_number = max(stored.next_cluster_number, int(stored.stream.get("first_cluster_number") or 0))
        state.former.adopt(
            records,
            next_number=next_number,
            last_frame_index=next_frame_index - 1 if next_frame_index > first_frame_index else None,
            last_timestamp_s=last_ts,
        )
        state.first_frame_index = first_frame_index
        state.next_frame_index = next_frame_index
        state.frames_ingested = frames_ingested
        self._reserve_restored_ids(state, next_number, next_frame_index)
        state.first_timestamp_s = _min(saved.get("first_timestamp_s"), *(e.start_s for e in entries))
        state.last_timestamp_s = last_ts
        state.text_cursor = max([state.text_cursor, saved.get("text_cursor") or 0] + [e.position_end for e in entries])
        for entry in entries:
            self._adopt_cluster(state, entry, summaries[entry.cluster_id])
        self._log_disk_past_budget(state.stream_id)
        last_sealed_s = _max(*(e.end_s for e in entries))
        meta = stored.stream.get("meta") or {}
        return RestoredStream(state.stream_id, meta, saved, len(entries), last_ts, last_sealed_s=last_sealed_s)

    def _reserve_restored_ids(self, state: StreamState, next_number: int, next_frame_index: int) -> None:
        self._reserved[state.stream_id] = (next_number, next_frame_index)
        try:
            self.ensure_ids(state)
        except OSError as err:  # nothing given out yet, reserved stays as set: the first id given out tries again
            log.error("stream %s: cannot reserve its next ids in its journal (%s); it is restored, and its first "
                      "ingest tries again", state.stream_id, err)  # fmt: skip

    def _adopt_cluster(self, state: StreamState, entry: ClusterEntry, summary: ClusterSummary) -> None:
        """One sealed cluster of a restored stream: on disk, its summary scored, its keyframes and bytes kept."""
        footprint = self.tiering.tiers.footprint_bytes(entry.num_tokens)  # the pages it takes once fetched
        self.tiering.residency.add(entry.cluster_id, state.stream_id, footprint, Tier.DISK, past_budget=True)
        self.tiering.summaries.put(entry.cluster_id, summary.key_sum, summary.key_sumsq, summary.key_count)
        self.tiering.tiers.adopt(entry.cluster_id)
        self._adopt_keyframes(state, entry)
        keyframe_bytes = sum(k["num_bytes"] for k in entry.keyframes)
        self.ledger.add(
            state.stream_id,
            entry.cluster_id,
            sealed_unix_s=self._written_unix_s(state.stream_id, entry),
            num_bytes=entry.num_bytes + keyframe_bytes,
        )

    def _log_disk_past_budget(self, stream_id: str) -> None:
        residency = self.tiering.residency
        if residency.free_bytes(Tier.DISK) < 0:
            log.error(
                "stream %s: the disk tier now holds %d bytes against its budget of %d; new clusters cannot spill "
                "to disk until retention frees room: raise disk_budget_bytes or shorten retention",
                stream_id, residency.used_bytes(Tier.DISK), residency.capacity_bytes(Tier.DISK),
            )  # fmt: skip

    def _written_unix_s(self, stream_id: str, entry: ClusterEntry) -> float:
        """The age the history budget goes by: as the journal keeps it, or for an older record, when it was
        written (its file's modification time)."""
        if entry.sealed_unix_s is not None:
            return entry.sealed_unix_s
        try:
            return (self.store.stream_dir(stream_id) / entry.file).stat().st_mtime
        except OSError:
            return time.time()

    def _adopt_keyframes(self, state: StreamState, entry: ClusterEntry) -> None:
        try:
            jpegs = self.store.read_keyframes(state.stream_id, entry)
        except Exception as err:  # the cluster's KV is still good: it comes back without thumbnails
            log.error("cannot restore the keyframes of cluster %s: %s", entry.cluster_id, err)
            return
        keyframes = [
            Keyframe(
                keyframe_id=make_keyframe_id(state.stream_id, int(meta["frame_index"])),
                stream_id=state.stream_id,
                cluster_id=entry.cluster_id,
                frame_index=int(meta["frame_index"]),
                timestamp_s=float(meta["timestamp_s"]),
                jpeg=jpeg,
                width=int(meta["width"]),
                height=int(meta["height"]),
            )
            for meta, jpeg in zip(entry.keyframes, jpegs, strict=True)
        ]
        if not keyframes_of(state, self.keyframes, self.tiering).keep(entry.cluster_id, keyframes, restored=True):
            log.warning(
                "cluster %s comes back without its keyframes: the host tier has no room for them", entry.cluster_id
            )


def _max(*values):
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _min(*values):
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _restored_frame_counts(stored: StoredStream, entries: list[ClusterEntry]) -> tuple[int, int, int]:
    """A restored stream's first frame index, frames ingested and next frame index."""
    first_frame_index = int(stored.stream.get("first_frame_index") or 0)  # journals before it was kept: 0
    # A count, not an index: indices skip past each restart's reserved block. The saved one is at most
    # state_interval_s old; the sealed clusters' frames bound it from below.
    frames_ingested = max(stored.state.get("frames_ingested") or 0, sum(len(e.frame_indices) for e in entries))
    next_frame_index = max(
        [first_frame_index + frames_ingested, stored.next_frame_index] + [max(e.frame_indices) + 1 for e in entries]
    )
    return first_frame_index, frames_ingested, next_frame_index


def _sealed_records(stream_id: str, entries: list[ClusterEntry]) -> list[ClusterRecord]:
    return [
        ClusterRecord(
            cluster_id=e.cluster_id,
            stream_id=stream_id,
            frame_indices=list(e.frame_indices),
            start_s=e.start_s,
            end_s=e.end_s,
            num_tokens=e.num_tokens,
            sealed=True,
            frame_timestamps_s=list(e.frame_timestamps_s),
            frame_num_tokens=list(e.frame_num_tokens),
        )
        for e in entries
    ]
