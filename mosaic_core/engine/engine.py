"""The engine facade: open streams, ingest frames from many streams in batches, ask questions.

One process, no Ray, gRPC or Redis. Not thread-safe: the service runs one engine per worker actor and calls it
from one thread at a time.

    engine = Engine.from_model("tiny", EngineConfig(mode="cluster"))
    engine.open_stream("cam-1", fps=1.0)
    engine.ingest([FrameInput("cam-1", t, rgb), ...])
    answer = engine.answer("cam-1", "when did the van leave?")
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mosaic_core.bookkeeping.formation import ClusterFormer
from mosaic_core.bookkeeping.maintenance import CoRetrievalTracker
from mosaic_core.bookkeeping.pages import pages_for
from mosaic_core.bookkeeping.residency import ResidencyManager
from mosaic_core.bookkeeping.tiers import Tier, TierBudgets
from mosaic_core.config import EngineConfig, RetrievalMode, device_budget_from_free
from mosaic_core.durable.checks import KVShape
from mosaic_core.durable.retired import FROM_ZERO, RetiredNumbers, StreamNumbers
from mosaic_core.durable.staging import StagingArena
from mosaic_core.durable.store import DurableStore
from mosaic_core.engine import ingest, questions, window_store
from mosaic_core.engine.decode_graphs import DecodeGraphs
from mosaic_core.engine.history import HistoryKeeper, RestoredStream
from mosaic_core.engine.ingest_pauses import IngestPauses
from mosaic_core.engine.introspection import IntrospectionMixin
from mosaic_core.engine.keyframe_store import KeyframeSettings, held_keyframes, store_for
from mosaic_core.engine.keyframes import Keyframe
from mosaic_core.engine.parts import EngineParts
from mosaic_core.engine.plans import IngestPlan
from mosaic_core.engine.prefill_graphs import PrefillGraphs
from mosaic_core.engine.results import (
    Answer,
    FrameInput,
    IngestResult,
    StreamStats,
    TokenEvent,
)
from mosaic_core.engine.stream import StreamState, check_stream_id
from mosaic_core.engine.summaries import SummaryIndex
from mosaic_core.engine.tiering import TierManager
from mosaic_core.engine.tower import EncodedFrames
from mosaic_core.engine.warm_up import WarmUpMixin
from mosaic_core.errors import (
    AlreadyExistsError,
    BudgetError,
    CapacityError,
    InvalidArgumentError,
    StateError,
    UnknownClusterError,
    UnknownStreamError,
    shown,
)
from mosaic_core.kernels import compiles
from mosaic_core.memory.tiers import KVTiers
from mosaic_core.model.adapter import VlmAdapter
from mosaic_core.model.frame_upload import FrameStaging

log = logging.getLogger(__name__)
DEFAULT_SYSTEM_PROMPT = "You are watching a live camera. Answer questions about what it has seen, and when."
UNLIMITED_BYTES = 1 << 62
CHECKPOINT_WAIT_S = 60.0  # how long a checkpoint waits for the durable store to write everything


class Engine(WarmUpMixin, IntrospectionMixin):
    """Streams of frames in, answers with evidence out, within the configured memory budgets."""

    def __init__(self, model: VlmAdapter, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config or EngineConfig()
        self.spec = model.kv_spec
        if model.device.type == "cuda":
            compiles.install()  # EngineStats.kernel_compiles
        # Full mode is the no-eviction baseline: its device tier is accounted but never limits.
        device_bytes = UNLIMITED_BYTES if self.config.mode is RetrievalMode.FULL else self.config.device_budget_bytes
        disk_bytes, disk_dir, durable = self.config.disk_budget_bytes, self.config.disk_dir, None
        self.retired = RetiredNumbers(self.config.retired_ids_dir or self.config.data_dir)
        if self.config.data_dir:
            durable = DurableStore(
                self.config.data_dir,
                writers=self.config.durable_writers,
                max_pending_bytes=self.config.durable_pending_bytes,
                kv_shape=KVShape.of(self.spec),  # recorded with each stream: a restart never adopts another model's KV
                retired=self.retired,  # a stream a restart sets aside frees its id: its numbers go on past
                # pinned here, once: pinning a block for each snapshot held the engine thread mid-pass
                staging=StagingArena(self.config.durable_pending_bytes, pin=True)
                if model.device.type == "cuda"
                else None,
            )
            # Sealed clusters are on disk anyway: the disk tier is on, bounded by retention unless a budget is set.
            disk_bytes = disk_bytes or UNLIMITED_BYTES
            if disk_dir is None:
                disk_dir = str(Path(self.config.data_dir) / ".spill")
                shutil.rmtree(disk_dir, ignore_errors=True)  # spills of unsealed clusters do not outlive a process
        budgets = TierBudgets(
            device_bytes=device_bytes,
            host_bytes=self.config.host_budget_bytes,
            disk_bytes=disk_bytes,
        )
        residency = ResidencyManager(budgets, policy=self.config.eviction_policy)
        full = self.config.mode is RetrievalMode.FULL
        tiers = KVTiers(
            self.spec,
            residency,
            device=model.device,
            page_tokens=self.config.arena_page_tokens,
            # full mode has no budget: its pool starts at the configured size and doubles when it runs out
            device_bytes=self.config.device_budget_bytes,
            grow_device=full,
            host_bytes=self.config.host_budget_bytes,
            pinned_host_bytes=self.config.pinned_host_bytes if model.device.type == "cuda" else 0,
            disk_dir=disk_dir,
            durable=durable,
        )
        self.tiering = TierManager(residency, tiers, SummaryIndex(self.spec, residency, device=model.device))
        encodes_off_thread = self.config.keyframes_per_cluster and self.config.keyframe_encode_threads
        self._keyframe_encoder = (
            ThreadPoolExecutor(self.config.keyframe_encode_threads, thread_name_prefix="mosaic-keyframes")
            if encodes_off_thread
            else None
        )
        keyframes = KeyframeSettings(
            count=self.config.keyframes_per_cluster,
            long_side_px=self.config.keyframe_long_side_px,
            jpeg_quality=self.config.keyframe_jpeg_quality,
            on_disk=durable is not None,
            encoder=self._keyframe_encoder,
        )
        self.history = None if durable is None else HistoryKeeper(durable, self.tiering, keyframes)
        self._keyframes_dropped_by_closed = 0  # streams closed since the engine started (``stats``)
        self.tracker = CoRetrievalTracker(residency)
        self.streams: dict[str, StreamState] = {}
        self.parts = EngineParts(
            model=model,
            config=self.config,
            spec=self.spec,
            tiering=self.tiering,
            tracker=self.tracker,
            history=self.history,
            keyframes=keyframes,
            streams=self.streams,
            decode_graphs=DecodeGraphs(
                model, self.tiering.tiers.pools, self.spec.num_layers, enabled=self.config.decode_graphs
            ),
            prefill_graphs=PrefillGraphs(
                model,
                self.tiering.tiers.pools,
                enabled=self.config.prefill_graphs,
                segment_layers=self.config.prefill_graph_layers,
                anchor=self.config.anchor_graphs,
            ),
            frame_staging=FrameStaging(model.device),
            # the highest priority there is: a stream's priority is clamped into the device's range
            question_stream=torch.cuda.Stream(model.device, priority=-100) if model.device.type == "cuda" else None,
            tower_stream=(
                torch.cuda.Stream(model.device) if model.device.type == "cuda" and self.config.tower_stream else None
            ),
        )
        working_set = self.config.retrieval_budget_tokens * self.spec.bytes_per_token
        window = self.config.local_window_tokens * self.spec.bytes_per_token
        if self.config.mode is not RetrievalMode.FULL and device_bytes < working_set + window:
            raise BudgetError(
                f"device budget {device_bytes} bytes is smaller than one question's working set plus a local "
                f"window ({working_set} + {window} bytes at {self.spec.bytes_per_token} bytes per token)"
            )

    @classmethod
    def from_model(
        cls,
        name_or_path: str,
        config: EngineConfig | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        device_budget_share: float | None = None,
        **adapter_options,
    ) -> Engine:
        """Builds the engine over a preset name (random weights) or a local checkpoint directory;
        ``adapter_options`` go to the model adapter (``Qwen25VLAdapter``'s constructor). With
        ``device_budget_share`` on CUDA, the device budget is that share of the GPU memory free once the model is
        loaded (``config.device_budget_from_free``), or the config's budget where that is larger."""
        from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter  # the one architecture so far

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = Qwen25VLAdapter.load(name_or_path, device=device, dtype=dtype, **adapter_options)
        config = config or EngineConfig()
        if device_budget_share is not None and model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(model.device)
            budget = device_budget_from_free(
                free,
                share=device_budget_share,
                floor_bytes=config.device_budget_bytes,
                tower_stream=config.tower_stream,
            )
            config = dataclasses.replace(config, device_budget_bytes=budget)
        return cls(model, config)

    # -- streams ------------------------------------------------------------------------------------------------
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

    def restore_streams(self) -> list[RestoredStream]:
        """Re-opens every stream found in the data directory and re-adopts its sealed clusters (disk tier). A
        stream the device has no room for now is left on disk, whole, for a start with more room; the others come
        back.

        Frames of the lost local window and open cluster are gone; the stream clock, frame count and cluster
        ids continue after the last recorded ones. Records past ``config.history_budget_bytes`` then go, the oldest
        first, whichever stream holds them. Returns nothing without a data directory.
        """
        if self.history is None:
            return []
        restored = []
        for stored in self.history.store.load_streams():
            stream = stored.stream
            try:
                state = self._open_state(stored.stream_id, float(stream["fps"]), stream.get("system_prompt"))
            except (BudgetError, torch.OutOfMemoryError) as err:  # no room now: its history waits on disk
                log.error("stream %s is not restored, its history is kept for a start with more room: %s",
                          stored.stream_id, err)  # fmt: skip
                self.history.store.leave(stored.stream_id)
                continue
            try:
                restored.append(self.history.adopt(state, stored))
            except Exception as err:  # what the store's checks did not foresee: this stream only, kept for a person
                log.exception("stream %s could not be adopted", stored.stream_id)
                self._forget_stream(state)
                self.history.store.set_aside(stored.stream_id, f"adopting it failed: {type(err).__name__}: {err}")
        dropped = self._keep_history_budget()  # once every stream is back: the oldest go, whichever stream holds them
        for stream in restored:
            stream.num_clusters -= len(dropped.get(stream.stream_id, ()))
        return restored

    def checkpoint(self) -> None:
        """Seals every open cluster, moves every local window into its clusters and waits until all of it is
        durable: a graceful shutdown loses nothing. Frames after this start new clusters.

        Raises:
            CapacityError: some windows' frames found no room in any tier, or their placement failed (a disk that
                refused a write); they stay in those windows, not durable, while every other stream's history is.
            StateError: the durable store did not write everything within its wait (a disk that fails or stalls),
                naming its last error.
        """
        held_back: dict[str, Exception] = {}
        for state in self.streams.values():
            state.former.seal()
            held_back |= window_store.flush_window(self.parts, state)
        if self.history is not None and not self.history.store.flush(CHECKPOINT_WAIT_S):
            last_error = self.history.store.snapshot_stats().last_error or "none recorded"
            raise StateError(
                f"the checkpoint's history is not all on disk after {CHECKPOINT_WAIT_S:g} s (the store's last error: "
                f"{last_error})"
            )
        if held_back:
            raise CapacityError(
                f"the checkpoint left frames in the local windows of streams {sorted(held_back)}, not durable: they "
                f"could not be stored ({window_store.why_held_back(next(iter(held_back.values())))})"
            )

    def save_stream_state(self, stream_id: str, **fields) -> None:
        """Keeps caller fields (JSON values) with the stream's durable state; ``restore_streams`` returns them.

        Safe from any thread (it only touches the durable store); a no-op without a data directory.
        """
        if self.history is not None:
            self.history.store.update_state(stream_id, **fields)

    def close(self) -> None:
        """Stops the durable writer after it has written everything queued, and the keyframe encoder."""
        if self.history is not None:
            self.history.store.close()
        if self._keyframe_encoder is not None:
            self._keyframe_encoder.shutdown(wait=True)

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

    # -- ingest -------------------------------------------------------------------------------------------------
    def ingest(
        self,
        frames: Sequence[FrameInput],
        *,
        pauses: IngestPauses | None = None,
        encoded: EncodedFrames | None = None,
    ) -> IngestResult:
        """Encodes a batch of frames from any number of streams.

        The batch is checked whole before anything changes, so a bad frame rejects the call and leaves every
        stream as it was. Frames of different streams share forward passes, one row per stream; a row carries
        up to ``config.max_frames_per_pass`` consecutive frames of its stream (a backlog catches up in fewer
        passes, still attending only to sink + local window + the row itself). With ``pauses`` the call stops at
        fixed points, where ``pauses.serve`` may start questions (``mosaic_core.engine.ingest_pauses``). With
        ``encoded`` from ``encode_ahead`` of these very frames, the call uses its vision tower's output. After it,
        history past ``config.history_budget_bytes`` goes, the clusters sealed first first.

        Frames leaving a local window that find no room in any tier stay in it, nothing lost; the call takes in
        none of their stream's frames after them, nor later calls any of that stream's frames until they find room
        (``IngestResult.refused``, ``mosaic_core.engine.ingest.ingest``).
        """
        result = ingest.ingest(self.parts, frames, pauses, encoded)
        self._keep_history_budget()
        return result

    def encode_ahead(self, frames: Sequence[FrameInput], *, pauses: IngestPauses | None = None) -> EncodedFrames:
        """Queues the vision tower of a batch that ``ingest`` will take next, with its uploads and keyframe
        thumbnails, and returns without waiting for the device. With ``config.tower_stream`` on CUDA the tower runs
        on its own stream, beside the language model still queued from the call before, and whatever the host does
        until ``ingest(frames, encoded=...)``. With ``pauses`` it stops where an ingest call's tower would (after
        each chunk of frames, and inside the tower), and ``pauses.serve`` may start questions there.

        The batch is checked as ``ingest`` checks it, and what the tower changes is what the call's own tower would:
        a new stream's frame size and window reservation, whose room may spill other clusters. The call uses the
        encoding only if it gets the same frames of the same streams (none closed and opened again meanwhile).

        Raises:
            as ``ingest`` does for a bad batch (``EmptyBatchError``, ``InvalidFrameError``, ``UnknownStreamError``,
            ``BudgetError``, ...), before any of the batch's tower is queued.
        """
        return ingest.encode(self.parts, frames, pauses)

    # -- questions ----------------------------------------------------------------------------------------------
    def ask(
        self,
        stream_id: str,
        question: str,
        *,
        max_new_tokens: int = 32,
        time_range: tuple[float, float] | None = None,
        measure_recall: bool = False,
        profile: bool = False,
    ) -> Iterator[TokenEvent | Answer]:
        """Answers ``question`` about one stream: yields each ``TokenEvent``, then the ``Answer``.

        ``measure_recall`` adds the attention-recall probe (slow: it reads every cluster); ``profile`` times
        scoring and fetching separately (CUDA events, read once the first token is in: no wait for the device).
        """
        return questions.ask(
            self.parts,
            self.stream(stream_id),
            question,
            max_new_tokens=max_new_tokens,
            time_range=time_range,
            measure_recall=measure_recall,
            profile=profile,
        )

    def answer(self, stream_id: str, question: str, **kwargs) -> Answer:
        """``ask`` run to the end; returns only the ``Answer``."""
        events = list(self.ask(stream_id, question, **kwargs))
        return events[-1]

    def keyframes(
        self,
        stream_id: str,
        *,
        keyframe_ids: Sequence[str] = (),
        cluster_id: str = "",
        latest: bool = False,
    ) -> list[Keyframe]:
        """JPEG thumbnails of a stream: the ones named (in that order), every one of ``cluster_id`` (in time
        order), or the newest; exactly one of the three.

        Raises:
            InvalidArgumentError: no or several selectors, too many ids, or a malformed id.
            UnknownKeyframeError: an id naming no held keyframe (NOT_FOUND).
            UnknownClusterError: ``cluster_id`` is not one of the stream's held clusters.
        """
        store = store_for(self.parts, self.stream(stream_id))
        chosen = [name for name, on in (("keyframe_ids", bool(keyframe_ids)), ("cluster_id", bool(cluster_id)),
                                         ("latest", latest)) if on]  # fmt: skip
        if len(chosen) != 1:
            what = "none" if not chosen else " and ".join(chosen)
            raise InvalidArgumentError(f"give exactly one of keyframe_ids, cluster_id and latest; got {what}")
        if latest:
            return store.latest()
        if keyframe_ids:
            return store.by_ids(list(keyframe_ids))
        if cluster_id not in self.stream(stream_id).records():
            raise UnknownClusterError(
                f"stream {stream_id!r} holds no cluster {shown(cluster_id)}: it was never one of its clusters, "
                "retention dropped it, or it was a cluster of an earlier stream of that id, deleted since"
            )
        return store.of_cluster(cluster_id)
