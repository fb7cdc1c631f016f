"""Streams' lives on an engine: opening, restoring after a restart, checkpointing, retention and closing."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable

import torch

from mosaic_core.bookkeeping.formation import ClusterFormer
from mosaic_core.bookkeeping.pages import pages_for
from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.durable import progress
from mosaic_core.durable.loading import StoredStream
from mosaic_core.durable.progress import RestoreProgress, size_text
from mosaic_core.durable.retired import FROM_ZERO, StreamNumbers
from mosaic_core.durable.store import DurableStats
from mosaic_core.engine import window_store
from mosaic_core.engine.history import RestoredStream
from mosaic_core.engine.keyframe_store import held_keyframes, store_for
from mosaic_core.engine.plans import IngestPlan
from mosaic_core.engine.results import StreamStats
from mosaic_core.engine.stream import StreamState, check_stream_id
from mosaic_core.errors import (
    AlreadyExistsError,
    BudgetError,
    CapacityError,
    InvalidArgumentError,
    StateError,
    UnknownStreamError,
)

log = logging.getLogger(__name__)
DEFAULT_SYSTEM_PROMPT = "You are watching a live camera. Answer questions about what it has seen, and when."
CHECKPOINT_WAIT_S = 60.0  # how long a checkpoint waits for the durable store to write everything


class StreamLifecycleMixin:
    """``Engine``'s streams, opened, restored, checkpointed, trimmed and closed; mixed into it: uses the engine's
    ``model``, ``config``, ``spec``, ``parts``, ``streams``, ``tiering``, ``tracker``, ``history`` and ``retired``,
    counts the keyframes of closed streams in its ``_keyframes_dropped_by_closed``, and answers ``open_stream`` with
    ``stream_stats`` (``IntrospectionMixin``)."""

    def open_stream(
        self, stream_id: str, *, fps: float = 1.0, system_prompt: str | None = None, meta: dict | None = None
    ) -> StreamStats:
        """Registers a stream and prefills its preamble, whose KV becomes the stream's attention sink.

        With a data directory the stream is recorded durably before this returns, with ``meta`` (any JSON the
        caller wants back from ``restore_streams`` after a restart). A stream opened under the id of a closed one
        numbers its clusters and frames on past that one's (``RetiredNumbers``), so no id the closed stream gave
        out (cluster ids, keyframe ids) names anything of the new one.
        """
        check_stream_id(stream_id)
        if stream_id in self.streams:
            raise AlreadyExistsError(f"stream {stream_id!r} is already open on this engine")
        if not fps > 0:
            raise InvalidArgumentError(f"fps must be positive, got {fps}")
        state = self._open_state(stream_id, fps, system_prompt, start=self.retired.start_of(stream_id))
        if self.history is not None:
            try:
                self.history.create(state, system_prompt=system_prompt, meta=meta or {})
            except BaseException:
                self._forget_stream(state)
                raise
        return self.stream_stats(stream_id)

    def restore_streams(self, on_progress: Callable[[RestoreProgress], None] | None = None) -> list[RestoredStream]:
        """Re-opens every stream found in the data directory and re-adopts its sealed clusters (disk tier). A
        stream the device has no room for now is left on disk, whole, for a start with more room, and counted in the
        store's ``streams_left``; the others come back.

        Frames of the lost local window and open cluster are gone; the stream clock, frame count and cluster
        ids continue after the last recorded ones. Records past ``config.history_budget_bytes`` then go, the oldest
        first, whichever stream holds them. Returns nothing without a data directory.

        It logs how far it has come while it runs (``RestoreProgress``), and at the end what came back, what did
        not and how long it took. ``on_progress`` watches each stream of both passes, reading and reopening.
        """
        if self.history is None:
            return []
        started_s = time.monotonic()
        before = self.history.store.snapshot_stats()
        loaded = self.history.store.load_streams(on_progress)
        reopening = RestoreProgress("reopening streams", len(loaded), on_progress)
        restored = []
        for stored in loaded:
            if (stream := self._restore_stream(stored)) is not None:
                restored.append(stream)
            reopening.step(num_records=len(stored.clusters), num_bytes=stored.num_bytes)
        dropped = self._keep_history_budget()  # once every stream is back: the oldest go, whichever stream holds them
        for stream in restored:
            stream.num_clusters -= len(dropped.get(stream.stream_id, ()))
        after = self.history.store.snapshot_stats()
        _log_restored(restored, self.history.ledger.total_bytes, before, after, time.monotonic() - started_s)
        return restored

    def _restore_stream(self, stored: StoredStream) -> RestoredStream | None:
        """One stream of ``restore_streams``: reopened with its history, or left on disk (no room), or set aside."""
        stream = stored.stream
        try:
            state = self._open_state(stored.stream_id, float(stream["fps"]), stream.get("system_prompt"))
        except (BudgetError, torch.OutOfMemoryError) as err:  # no room now: its history waits on disk
            log.error("stream %s is not restored, its history is kept for a start with more room: %s",
                      stored.stream_id, err)  # fmt: skip
            self.history.store.leave(stored.stream_id, "no_room")
            return None
        try:
            return self.history.adopt(state, stored)
        except Exception as err:  # what the store's checks did not foresee: this stream only, kept for a person
            log.exception("stream %s could not be adopted", stored.stream_id)
            self._forget_stream(state)
            self.history.store.set_aside(stored.stream_id, f"adopting it failed: {type(err).__name__}: {err}")
            return None

    def rewind_to_sealed(self, stream_id: str) -> float | None:
        """Takes a restored stream's newest frame time back to the newest frame of its sealed clusters (with none,
        it has no first frame either), so that the frames a crash lost after it may be ingested again at the times
        they had (a file read again from its position). Frame indices and cluster numbers go on past every one
        given out before. Returns that time.

        Raises:
            StateError: the stream took a frame since it was restored.
        """
        state = self.stream(stream_id)
        if state.local:
            raise StateError(f"stream {stream_id!r} took frames since it was restored; it cannot rewind")
        state.last_timestamp_s = state.former.rewind_to_sealed()
        if state.last_timestamp_s is None:
            state.first_timestamp_s = None
        return state.last_timestamp_s

    def checkpoint(self) -> None:
        """Seals every open cluster, moves every local window into its clusters and waits until all of it is
        durable: a graceful shutdown loses nothing. Frames after this start new clusters. The wait is logged: what
        it waits for, every ``PROGRESS_INTERVAL_S`` while it lasts, and how long it took.

        Raises:
            CapacityError: some windows' frames found no room in any tier, or their placement failed (a disk that
                refused a write); they stay in those windows, not durable, while every other stream's history is.
            StateError: the durable store did not write everything within its wait (a disk that fails or stalls),
                naming its last error.
        """
        held_back: dict[str, Exception] = {}
        for state in self.streams.values():
            state.former.seal()
            if (keyframes := held_keyframes(state)) is not None:
                keyframes.seal()  # else its picker stays on the sealed cluster, past a retention drop or a merge
            held_back |= window_store.flush_window(self.parts, state)
        if self.history is not None:
            self._wait_durable()
        if held_back:
            raise CapacityError(
                f"the checkpoint left frames in the local windows of streams {sorted(held_back)}, not durable: they "
                f"could not be stored ({window_store.why_held_back(next(iter(held_back.values())))})"
            )

    def _wait_durable(self) -> None:
        """The checkpoint's wait for the durable store, which logs what it waits for: at the start, every
        ``PROGRESS_INTERVAL_S`` while it lasts (with the store's last error: a full or stalled disk shows there), and
        how long it took."""
        store, started_s = self.history.store, time.monotonic()
        stats = store.snapshot_stats()
        log.info("checkpoint: waiting up to %g s for the durable store to write %s (%s of snapshots not yet in "
                 "their files) and the streams' states", CHECKPOINT_WAIT_S, _count(stats.pending_clusters, "cluster"),
                 size_text(stats.pending_bytes))  # fmt: skip
        while not store.flush(min(progress.PROGRESS_INTERVAL_S, started_s + CHECKPOINT_WAIT_S - time.monotonic())):
            stats = store.snapshot_stats()
            if time.monotonic() - started_s >= CHECKPOINT_WAIT_S:
                raise StateError(
                    f"the checkpoint's history is not all on disk after {CHECKPOINT_WAIT_S:g} s (the store's last "
                    f"error: {stats.last_error or 'none recorded'})"
                )
            log.warning("checkpoint: still waiting after %.1f s for the durable store (%s not yet journalled, %s of "
                        "snapshots not yet in their files, or the streams' states); its last error: %s",
                        time.monotonic() - started_s, _count(stats.pending_clusters, "cluster"),
                        size_text(stats.pending_bytes), stats.last_error or "none")  # fmt: skip
        log.info("checkpoint: every stream's history is on disk after %.1f s", time.monotonic() - started_s)

    def save_stream_state(self, stream_id: str, **fields) -> None:
        """Keeps caller fields (JSON values) with the stream's durable state; ``restore_streams`` returns them.

        Safe from any thread (it only touches the durable store); a no-op without a data directory.
        """
        if self.history is not None:
            self.history.store.update_state(stream_id, **fields)

    def write_stream_state(self, stream_id: str, **fields) -> None:
        """``save_stream_state``, but on disk when it returns: for a field a crash must not lose, even one within the
        second or so a saved state may wait (``DurableStore.write_state``).

        Raises:
            OSError: the write failed; the fields are kept, and written with the next saved state.
        """
        if self.history is not None:
            self.history.store.write_state(stream_id, **fields)

    def _open_state(
        self, stream_id: str, fps: float, system_prompt: str | None, *, start: StreamNumbers = FROM_ZERO
    ) -> StreamState:
        formation = self.config.formation
        pools = self.tiering.tiers.pools
        state = StreamState(
            stream_id,
            fps=fps,
            former=ClusterFormer(stream_id, formation, first_number=start.next_cluster_number),
            pools=pools,
            first_frame_index=start.next_frame_index,
        )
        ids = self.model.stream_preamble(system_prompt or DEFAULT_SYSTEM_PROMPT)
        fills = pages_for(len(ids), pools.page_tokens)
        self.parts.reserve_window(state, sink_pages=len(fills))
        pages = pools.take(Tier.DEVICE, len(fills))
        assert pages is not None, "the sink's pages were reserved but are not free"
        plan = IngestPlan([state], self.spec, pools, [pages], [fills])  # the preamble attends to itself only
        input_ids = torch.tensor([ids], device=self.model.device)
        positions = self.model.text_positions(0, len(ids))[:, None, :]
        self.model.forward(input_ids=input_ids, position_ids=positions, plan=plan)
        state.set_sink(pages, fills)
        state.position_base = state.text_cursor = len(ids)
        self.streams[stream_id] = state
        return state

    def close_stream(self, stream_id: str, *, forget_history: bool = True) -> None:
        """Closes a stream and frees every byte it held in every tier, its durable history included unless
        ``forget_history`` is False (the stream comes back at the next restart).

        Raises:
            StateError: a question still reads the stream's clusters (end or close its answers first); nothing is
                changed then.
        """
        state = self.stream(stream_id)
        residency = self.tiering.residency
        read = [cid for cid in residency.clusters(stream_id) if residency.record_to_read(cid).pinned]
        if read:
            raise StateError(
                f"stream {stream_id!r} cannot be closed while a question reads it ({len(read)} of its clusters are "
                "in use); end or close its answers first"
            )
        # Before the history goes: a crash in between leaves both, and the numbers' maximum is kept anyway.
        ended_at = StreamNumbers(next_cluster_number=state.former.next_number, next_frame_index=state.next_frame_index)
        forgets = self.history is not None and forget_history
        try:
            self.retired.retire(stream_id, ended_at)
            retired = True
        except OSError as err:  # a full disk: deleting a stream is how an operator frees it, so that goes first
            if not (forgets and err.errno == errno.ENOSPC):
                raise
            retired = False
        if forgets:
            self.history.close(stream_id)  # first: once this returns, a restart cannot bring the stream back
        if not retired:
            # A move into the trash frees no byte, and the writer may empty it only after the commits ahead of it
            # (one of which may wait for this very room): the history's bytes leave the full disk here, first.
            self.history.store.empty_trash()
            try:
                self.retired.retire(stream_id, ended_at)  # in the room the history left
            except OSError as err:
                log.error("stream %s is deleted, but its numbers are not kept (%s): a new stream of that id counts "
                          "its clusters and frames from 0", stream_id, err)  # fmt: skip
        self._forget_stream(state)

    def _forget_stream(self, state: StreamState) -> None:
        state.closed = True
        store = held_keyframes(state)
        if store is not None:
            self._keyframes_dropped_by_closed += store.num_dropped
            store.close()
        self.tiering.drop_stream(state.stream_id)
        self.tracker.drop_stream(state.stream_id)
        if self.history is not None:  # its records stay on disk with forget_history=False, no longer this engine's
            self.history.ledger.forget_stream(state.stream_id)
        self.tiering.residency.release(f"{state.stream_id}:sink+window")
        self.tiering.tiers.pools.give_back(Tier.DEVICE, state.past_pages())  # a question reading them holds them
        state.sink_pages, state.sink_fills = [], []
        state.local.clear()
        del self.streams[state.stream_id]

    def drop_clusters_before(self, stream_id: str, cutoff_s: float) -> list[str]:
        """Retention: forgets every sealed cluster of a stream that ended before ``cutoff_s``.

        Clusters with frames still in the local window, or read by a question right now, are kept. Returns the
        dropped ids; their bytes are freed in whichever tier held them.
        """
        state = self.stream(stream_id)
        residency, in_window = self.tiering.residency, state.local_cluster_ids()
        expired = []
        for r in state.former.records_to_read():  # in order of start: none after the cutoff ended before it
            if r.start_s >= cutoff_s:
                break
            if (
                r.sealed
                and r.end_s < cutoff_s
                and r.cluster_id in residency
                and r.cluster_id not in in_window
                and not residency.record_to_read(r.cluster_id).pinned
            ):
                expired.append(r.cluster_id)
        self._drop_clusters(state, expired)
        return expired

    def _drop_clusters(self, state: StreamState, cluster_ids: list[str]) -> None:
        for cluster_id in cluster_ids:
            self.tiering.remove(cluster_id)
            state.former.remove(cluster_id)
        store_for(self.parts, state).forget(cluster_ids)
        if self.history is not None:
            self.history.on_drop(state, cluster_ids)

    def _keep_history_budget(self) -> dict[str, list[str]]:
        """Past ``config.history_budget_bytes`` of records, drops the clusters sealed first (``RecordLedger``),
        across the streams, as retention drops them (a cluster a question reads now is passed over), and logs it;
        returns the ids dropped, by stream."""
        history, budget = self.history, self.config.history_budget_bytes
        if history is None or budget <= 0 or history.ledger.total_bytes <= budget:
            return {}
        residency = self.tiering.residency

        def can_drop(stream_id: str, cluster_id: str) -> bool:
            state = self.streams.get(stream_id)
            return (
                state is not None
                and cluster_id in residency
                and not residency.record_to_read(cluster_id).pinned
                and cluster_id not in state.local_cluster_ids()
            )

        by_stream: dict[str, list[str]] = {}
        for stream_id, cluster_id in history.ledger.oldest_over(budget, can_drop):
            by_stream.setdefault(stream_id, []).append(cluster_id)
        for stream_id, cluster_ids in by_stream.items():
            self._drop_clusters(self.streams[stream_id], cluster_ids)
            history.dropped_for_space += len(cluster_ids)
            log.info(
                "stream %s: dropped its %d oldest clusters, the history's records at %d bytes against "
                "history_budget_bytes=%d",
                stream_id, len(cluster_ids), history.ledger.total_bytes, budget,
            )  # fmt: skip
        return by_stream

    def stream(self, stream_id: str) -> StreamState:
        state = self.streams.get(stream_id)
        if state is None:
            raise UnknownStreamError(f"no stream {stream_id!r} is open on this engine")
        return state


def _log_restored(
    restored: list[RestoredStream], num_bytes: int, before: DurableStats, after: DurableStats, elapsed_s: float
) -> None:
    """The restore's summary: what came back, what did not (each logged before, with where to look), how long."""
    left = {r: n - before.streams_left.get(r, 0) for r, n in after.streams_left.items()}
    left_text = ", ".join(f"{reason}: {n}" for reason, n in sorted(left.items()) if n)
    log.info(
        "restored %s with %d sealed clusters (%s of records) in %.1f s; %s left on disk unserved%s, %s and %s set "
        "aside under .unreadable",
        _count(len(restored), "stream"), sum(r.num_clusters for r in restored), size_text(num_bytes), elapsed_s,
        _count(sum(left.values()), "stream"), f" ({left_text})" if left_text else "",
        _count(after.streams_set_aside - before.streams_set_aside, "stream"),
        _count(after.clusters_set_aside - before.clusters_set_aside, "cluster record"),
    )  # fmt: skip


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
