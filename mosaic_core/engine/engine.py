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
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mosaic_core.bookkeeping.maintenance import CoRetrievalTracker
from mosaic_core.bookkeeping.residency import ResidencyManager
from mosaic_core.bookkeeping.tiers import TierBudgets
from mosaic_core.config import EngineConfig, RetrievalMode, device_budget_from_free
from mosaic_core.durable.checks import KVShape
from mosaic_core.durable.retired import RetiredNumbers
from mosaic_core.durable.staging import StagingArena
from mosaic_core.durable.store import DurableStore
from mosaic_core.engine import ingest, questions
from mosaic_core.engine.decode_graphs import DecodeGraphs
from mosaic_core.engine.history import HistoryKeeper
from mosaic_core.engine.ingest_pauses import IngestPauses
from mosaic_core.engine.introspection import IntrospectionMixin
from mosaic_core.engine.keyframe_store import KeyframeSettings, store_for
from mosaic_core.engine.keyframes import Keyframe
from mosaic_core.engine.parts import EngineParts
from mosaic_core.engine.prefill_graphs import PrefillGraphs
from mosaic_core.engine.results import Answer, FrameInput, IngestResult, TokenEvent
from mosaic_core.engine.stream import StreamState
from mosaic_core.engine.stream_lifecycle import StreamLifecycleMixin
from mosaic_core.engine.summaries import SummaryIndex
from mosaic_core.engine.tiering import TierManager
from mosaic_core.engine.tower import EncodedFrames
from mosaic_core.engine.warm_up import WarmUpMixin
from mosaic_core.errors import BudgetError, InvalidArgumentError, UnknownClusterError, shown
from mosaic_core.kernels import compiles
from mosaic_core.memory.host_growth import fault_pages_before_pinning
from mosaic_core.memory.tiers import KVTiers
from mosaic_core.model.adapter import VlmAdapter
from mosaic_core.model.frame_upload import FrameStaging

UNLIMITED_BYTES = 1 << 62


class Engine(StreamLifecycleMixin, WarmUpMixin, IntrospectionMixin):
    """Streams of frames in, answers with evidence out, within the configured memory budgets.

    Opening, restoring, checkpointing and closing streams, the warm-up, and the read-only views are mixed in from
    ``stream_lifecycle``, ``warm_up`` and ``introspection``.
    """

    def __init__(self, model: VlmAdapter, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config or EngineConfig()
        self.spec = model.kv_spec
        if model.device.type == "cuda":
            compiles.install()  # EngineStats.kernel_compiles
            fault_pages_before_pinning()  # pinning a host chunk ahead then holds the driver (and this thread) briefly
        self.retired = RetiredNumbers(self.config.retired_ids_dir or self.config.data_dir)
        durable = self._durable_store(model.device) if self.config.data_dir else None
        self.tiering = self._tier_manager(durable)
        keyframes = self._keyframe_settings(on_disk=durable is not None)
        self.history = None if durable is None else HistoryKeeper(durable, self.tiering, keyframes)
        self._keyframes_dropped_by_closed = 0  # streams closed since the engine started (``stats``)
        self.tracker = CoRetrievalTracker(self.tiering.residency)
        self.streams: dict[str, StreamState] = {}
        self.parts = self._engine_parts(keyframes)
        self._check_device_budget()

    def _device_tier_bytes(self) -> int:
        # Full mode is the no-eviction baseline: its device tier is accounted but never limits.
        return UNLIMITED_BYTES if self.config.mode is RetrievalMode.FULL else self.config.device_budget_bytes

    def _tier_manager(self, durable: DurableStore | None) -> TierManager:
        """The tiers' budgets, residency and pages; with a durable store, a disk tier even where none is configured."""
        config, device = self.config, self.model.device
        disk_bytes, disk_dir = config.disk_budget_bytes, config.disk_dir
        if durable is not None:
            # Sealed clusters are on disk anyway: the disk tier is on, bounded by retention unless a budget is set.
            disk_bytes = disk_bytes or UNLIMITED_BYTES
            if disk_dir is None:
                disk_dir = str(Path(config.data_dir) / ".spill")  # cleared of a previous process's by KVTiers
        budgets = TierBudgets(
            device_bytes=self._device_tier_bytes(),
            host_bytes=config.host_budget_bytes,
            disk_bytes=disk_bytes,
        )
        residency = ResidencyManager(budgets, policy=config.eviction_policy)
        full = config.mode is RetrievalMode.FULL
        tiers = KVTiers(
            self.spec,
            residency,
            device=device,
            page_tokens=config.page_tokens or self.model.largest_frame_tokens(config.target_tokens_per_frame),
            # full mode has no budget: its pool starts at the configured size and doubles when it runs out
            device_bytes=config.device_budget_bytes,
            grow_device=full,
            host_bytes=config.host_budget_bytes,
            pinned_host_bytes=config.pinned_host_bytes if device.type == "cuda" else 0,
            disk_dir=disk_dir,
            durable=durable,
        )
        return TierManager(residency, tiers, SummaryIndex(self.spec, residency, device=device))

    def _engine_parts(self, keyframes: KeyframeSettings) -> EngineParts:
        """What ingest and questions share, with the CUDA graphs and streams they run on."""
        model, config, pools = self.model, self.config, self.tiering.tiers.pools
        on_cuda = model.device.type == "cuda"
        return EngineParts(
            model=model,
            config=config,
            spec=self.spec,
            tiering=self.tiering,
            tracker=self.tracker,
            history=self.history,
            keyframes=keyframes,
            streams=self.streams,
            decode_graphs=DecodeGraphs(model, pools, self.spec.num_layers, enabled=config.decode_graphs),
            prefill_graphs=PrefillGraphs(
                model,
                pools,
                enabled=config.prefill_graphs,
                segment_layers=config.prefill_graph_layers,
                anchor=config.anchor_graphs,
            ),
            frame_staging=FrameStaging(model.device),
            # the highest priority there is: a stream's priority is clamped into the device's range
            question_stream=torch.cuda.Stream(model.device, priority=-100) if on_cuda else None,
            tower_stream=torch.cuda.Stream(model.device) if on_cuda and config.tower_stream else None,
        )

    def _check_device_budget(self) -> None:
        device_bytes = self._device_tier_bytes()
        working_set = self.config.retrieval_budget_tokens * self.spec.bytes_per_token
        window = self.config.local_window_tokens * self.spec.bytes_per_token
        if self.config.mode is not RetrievalMode.FULL and device_bytes < working_set + window:
            raise BudgetError(
                f"device budget {device_bytes} bytes is smaller than one question's working set plus a local "
                f"window ({working_set} + {window} bytes at {self.spec.bytes_per_token} bytes per token)"
            )

    def _durable_store(self, device: torch.device) -> DurableStore:
        config = self.config
        return DurableStore(
            config.data_dir,
            writers=config.durable_writers,
            max_pending_bytes=config.durable_pending_bytes,
            kv_shape=KVShape.of(self.spec),  # recorded with each stream: a restart never adopts another model's KV
            retired=self.retired,  # a stream a restart sets aside frees its id: its numbers go on past
            # pinned here, once: pinning a block for each snapshot held the engine thread mid-pass
            staging=StagingArena(config.durable_pending_bytes, pin=True) if device.type == "cuda" else None,
        )

    def _keyframe_settings(self, *, on_disk: bool) -> KeyframeSettings:
        """How sealed clusters' keyframes are kept; starts the threads that encode them off the engine thread, when
        configured (``_keyframe_encoder``, shut down by ``close``)."""
        config = self.config
        encodes_off_thread = config.keyframes_per_cluster and config.keyframe_encode_threads
        self._keyframe_encoder = (
            ThreadPoolExecutor(config.keyframe_encode_threads, thread_name_prefix="mosaic-keyframes")
            if encodes_off_thread
            else None
        )
        return KeyframeSettings(
            count=config.keyframes_per_cluster,
            long_side_px=config.keyframe_long_side_px,
            jpeg_quality=config.keyframe_jpeg_quality,
            on_disk=on_disk,
            encoder=self._keyframe_encoder,
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

    def close(self, timeout_s: float = 60.0) -> None:
        """Stops the durable writer after it has written everything queued (waiting up to ``timeout_s`` for the
        writes, and as long again for its thread), the keyframe encoder, and the thread that pins host chunks ahead."""
        self.tiering.tiers.pools.close()
        if self.history is not None:
            self.history.store.close(timeout_s)
        if self._keyframe_encoder is not None:
            self._keyframe_encoder.shutdown(wait=True)

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

        Frames leaving a local window that cannot be stored (no room in any tier, or a store that fails) stay in it,
        nothing lost; the call takes in none of their stream's frames after them, nor later calls any of that
        stream's frames until they are stored
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
