"""Engine configuration: frozen, keyword-only, with units in the names.

Pydantic and config files live at the service edge; the core takes these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from mosaic_core.bookkeeping.formation_config import FormationConfig
from mosaic_core.errors import ConfigError, InvalidArgumentError, UnknownPolicyError

MIB = 1 << 20
GIB = 1 << 30
SCORER_NAMES = ("spread", "spread_per_token", "spread_share", "spread_share_per_token", "mean_key", "random", "recent")
# Left out of a device budget sized from free GPU memory, for the engine's work outside the budget (the vision
# tower's activations, a pass's scratch, question and decode graphs): on the H200 at 192 cameras the GPU held about
# 11 GiB beyond an 80-GiB budget and the 7B model's 15.5 GiB of weights (bench/NOTES.md, session 27), and the
# share left out (1 - share of the free memory) covers what this does not.
BUDGET_WORKSPACE_BYTES = 2 * GIB
# Left out as well with the vision tower on a CUDA stream of its own (EngineConfig.tower_stream), whose activations
# PyTorch's allocator keeps in a pool of that stream's: about 2.4 GB more reserved than without, in scenario B at 192
# and 256 cameras with calls of 128 frames (bench/NOTES.md, session 36, on an H100).
TOWER_STREAM_WORKSPACE_BYTES = 5 * GIB // 2
# The share of free GPU memory the benchmarks (engine scenario B, the service's) give the device budget.
BENCH_DEVICE_BUDGET_SHARE = 0.8


MAX_NEW_TOKENS_LIMIT = 512  # EngineConfig.max_new_tokens_limit's default


def check_max_new_tokens(max_new_tokens: int, limit: int) -> None:
    """Refuses an answer length outside ``1..limit``: the engine's check, and the router's before a question takes
    a queue slot, in one sentence.

    Raises:
        InvalidArgumentError: ``max_new_tokens`` is below 1 or above ``limit``.
    """
    if not 0 < max_new_tokens <= limit:
        raise InvalidArgumentError(f"max_new_tokens must be in 1..{limit}, got {max_new_tokens}")


def budget_workspace_bytes(*, tower_stream: bool) -> int:
    """What a device budget sized from free GPU memory leaves out for the engine's work outside it."""
    return BUDGET_WORKSPACE_BYTES + (TOWER_STREAM_WORKSPACE_BYTES if tower_stream else 0)


def device_budget_from_free(free_bytes: int, *, share: float, floor_bytes: int, tower_stream: bool = False) -> int:
    """A device budget of ``share`` of the GPU memory free once the model is loaded, less
    ``budget_workspace_bytes``, and never under ``floor_bytes``."""
    if not 0 < share < 1:
        raise ConfigError(f"device budget share {share} must be between 0 and 1 (exclusive)")
    return max(floor_bytes, int(free_bytes * share) - budget_workspace_bytes(tower_stream=tower_stream))


class RetrievalMode(StrEnum):
    """How a question finds the stream history it attends to.

    - FULL keeps every KV state on the device and attends to all of it (the plain-transformers baseline).
    - TOKEN is the ReKV-style baseline: frame-sized blocks, scored by their mean key, copied block by block,
      never cached on the device, every layer scoring for itself (what ReKV's own code does).
    - FRAME is frame blocks on Mosaic's machinery: one-frame units scored by their mean key, but gathered in one
      launch, cached on the device and shared across layers exactly like clusters. Beside CLUSTER it isolates what
      the retrieval unit alone buys.
    - CLUSTER is Mosaic: cross-modal clusters scored by each query row's estimated share of attention (from the
      clusters' centroids and spreads) per token, moved and cached whole.
    """

    FULL = "full"
    FRAME = "frame"
    TOKEN = "token"
    CLUSTER = "cluster"

    @property
    def own_scorer(self) -> str:
        """The scorer a question ranks units by when ``EngineConfig.scorer`` names none: ``spread_share_per_token``
        for clusters (the best recall of the H200 sweep, bench/NOTES.md session 34), and ReKV's mean key for
        one-frame units. Full mode chooses everything, so its scores are only recorded: the cheaper ``spread``."""
        if self is RetrievalMode.CLUSTER:
            return "spread_share_per_token"
        return "spread" if self is RetrievalMode.FULL else "mean_key"

    @property
    def one_frame_units(self) -> bool:
        """Every frame is its own retrieval unit (no clustering)."""
        return self in (RetrievalMode.TOKEN, RetrievalMode.FRAME)

    @property
    def caches_on_device(self) -> bool:
        """New units go to the device tier and retrieved ones are promoted there; the ReKV baseline keeps its
        blocks on the host."""
        return self is not RetrievalMode.TOKEN

    @classmethod
    def parse(cls, name: str | RetrievalMode) -> RetrievalMode:
        try:
            return cls(name)
        except ValueError:
            valid = ", ".join(m.value for m in cls)
            raise UnknownPolicyError(f"unknown retrieval mode {name!r}; valid modes are: {valid}") from None


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Everything the engine needs to know besides the model.

    Attributes:
        mode: retrieval mode, one switch for the whole engine.
        target_tokens_per_frame: visual tokens per frame the frame size is chosen for.
        page_tokens: token slots of one page of the KV arena; None sizes a page to hold the largest frame the model
            makes at ``target_tokens_per_frame`` (``largest_frame_tokens``: 66 at 64, 133 at 128). A frame starts a
            fresh page and takes as many as it needs, so a page the size of a frame wastes nothing, and a frame a
            token longer than its page takes a second page, nearly empty.
        local_window_tokens: recent KV every new frame and question attends to.
        max_frames_per_pass: consecutive frames of one stream that may share a forward pass (a backlog catches
            up faster; each frame still attends only to sink + window + the frames before it in the pass).
        retrieval_budget_tokens: history KV a question may retrieve per layer.
        device_budget_bytes: device-tier bytes shared by all streams (GPU memory, or an accounted CPU pool).
        host_budget_bytes: host-tier bytes (pinned when CUDA is present).
        pinned_host_bytes: host memory pinned once when the engine starts (under CUDA) and handed out to
            host-tier clusters, so a spill never pins memory on the ingest path; beyond it, clusters are pinned
            one by one. Size it to the host tier the streams will fill; 0 pins on demand only.
        disk_budget_bytes: disk-tier bytes; 0 disables the disk tier.
        disk_dir: where the disk tier keeps its files; required when disk_budget_bytes > 0 unless data_dir is set.
            An engine starting there deletes the spill files a previous process left (``<stream>/c<number>``).
        data_dir: where camera history is kept durably: every sealed cluster is written behind to a record file
            with a per-stream manifest, and a new engine on the same directory re-adopts it (see
            ``mosaic_core.durable``). With it, the disk tier is always on: sealed clusters spill to disk by
            dropping their memory copy, and disk_budget_bytes (0: no limit) caps the clusters in the disk tier;
            records of the others are on disk too, bounded by retention, and a restart adopts them all into the
            disk tier, counted even past the budget.
        history_budget_bytes: with data_dir, the bytes of sealed clusters' records (KV and keyframes) the engine
            keeps; past it, after an ingest call or a restart, the clusters sealed first (wall-clock), across the
            streams, are dropped as retention drops them (their records deleted; counted in
            ``HistoryKeeper.dropped_for_space``). 0: no limit (retention alone bounds the history).
        retired_ids_dir: where the next cluster and frame numbers of closed streams are kept, so that a stream
            opened again under a closed one's id numbers on past it and no id the closed stream gave out names
            anything of the new one (``mosaic_core.durable.retired``). Engines that may open the same stream ids
            in turn (a service's workers) share one. None: data_dir, or memory alone without a data_dir.
        durable_writers: threads that write record files side by side under data_dir (the checksum, write and fsync
            of one file release the GIL); at 64 cameras a 7B model seals about 0.5 GB of KV a second.
        durable_pending_bytes: snapshot bytes that may wait for those writers before ingest waits for them (host
            memory beyond the host tier). Cameras that start together seal clusters together, in bursts larger
            than the writers' pace: at 128 cameras on the H200, ingest ran at 143 frames/s with 1 GiB, waiting on
            it, and at 166 with 4 GiB, never waiting (bench/NOTES.md, session 14). On CUDA this much host memory
            is pinned when the engine starts (PyTorch's pinned allocator rounds it up to a power of two), and the
            snapshots are taken from it (``mosaic_core.durable.staging``).
        eviction_policy: name of the policy that picks which clusters to spill ("lru" or "heat").
        host_copy_below_device_free: when less than this share of the device tier is free, a cluster that
            completes on the device (sealed, its last frame out of the local window) gets its host copy right
            then, queued on the side stream with nothing waiting for it. A later spill, such as the room a
            question takes, then frees its device pages without a copy (``KVTiers.keep_host_copy``). 0: never;
            a spill copies the cluster to the host when it happens, in the time of whatever makes the room.
        prefetch_after_layer: in cluster mode, the layer whose choice of clusters every later layer reuses, so
            their gathers are queued at once and move while the layers before them compute; layers up to it
            score their own queries. None scores every layer itself (each waits for its own choice and gather).
        rescore_every_tokens: decode steps between re-scoring clusters; 0 scores once per question.
        decode_graphs: on CUDA, replay decode steps from CUDA graphs (``mosaic_core.engine.decode_graphs``);
            questions that measure recall or re-score while decoding always decode eagerly.
        prefill_graphs: on CUDA, replay a question prefill's layers after ``prefetch_after_layer`` from CUDA graphs
            (``mosaic_core.engine.prefill_graphs``); modes that score every layer, and questions that measure
            recall, prefill eagerly.
        anchor_graphs: with ``prefill_graphs``, replay the layers up to ``prefetch_after_layer`` too, from graphs cut
            where each of them chooses (``mosaic_core.engine.anchor_graphs``); False runs them eagerly.
        prefill_graph_layers: layers per graph of that prefill's chain; before each graph the GPU waits only for
            its own layers' retrieved KV, so the rest crosses PCIe while it computes. The number of layers or more
            makes one graph, which waits for every layer's KV before it starts.
        staging_copy: how retrieved host pages reach the question's device pages: "dma", a copy per page and
            group of layers (``staging_groups``; ``staging_batch``), on the copy engines, which
            leaves the SMs to the question (``mosaic_core.memory.cudart``; the kernel where the CUDA runtime is
            not found); or "kernel", the slab-gather kernel, one launch per layer, reading pinned memory from the
            SMs (at 60 minutes on the H200: TTFT 39.9 ms against 29.6 with "dma", bench/NOTES.md).
        staging_groups: with "dma", the layers each copy holds, group by group from the first layer after
            ``prefetch_after_layer``, the last size repeating to the last layer; () copies ``prefill_graph_layers``
            layers a time. Larger early groups cost fewer copies (a copy has a fixed cost), and a small last group
            keeps short the compute left once the last bytes land; each layer still waits only for its own group.
            On H100s at 60 minutes, 8, 8, 6 and 4 layers moved a question's staging at 87% and 85% of PCIe,
            against 80% in groups of 4, in two runs; once a question's copy rows were built at once, at 86% against
            85% (bench/NOTES.md, sessions 44 and 45).
        staging_streams: with "dma", how many streams the runs of one group of layers are dealt to, so that more
            copies are in flight at once (``TransferEngine.copy_runs``); 1 queues them all on the side stream.
        staging_batch: with "dma", each stream's runs of a group go to the copy engines in one
            ``cudaMemcpyBatchAsync`` call (CUDA 12.8 and later; one ``cudaMemcpyAsync`` a run before it, or where
            the runtime lacks it). On the H200 the staging of a 60-minute question moved at 99% of one contiguous
            copy's rate that way, against 85% a call a run (``bench.copy_runs_sweep``, session 43).
        tower_stream: on CUDA, an ingest call's uploads, keyframe thumbnails and vision tower are queued on a
            CUDA stream of their own, which waits for nothing the language model does, so the device can run them
            beside the previous call's language model; the language model then waits for them on the device, not
            the host. False queues them on the compute stream, behind everything queued before
            (``mosaic_core.engine.tower``).
        max_question_tokens: questions longer than this are rejected.
        max_new_tokens_limit: upper bound a caller may ask for per answer.
        evidence_spans: how many ranked clusters an answer cites as evidence; a cluster that joined several visits
            of a scene cites each visit as its own span, sharing the rank.
        merge_min_questions: questions that must retrieve a pair of neighbours before maintenance merges them.
        merge_min_joint_fraction: share of those questions that must retrieve both neighbours.
        formation: visual-coherence rules for forming clusters online.
        scorer: how a question ranks units: None takes the mode's own (``RetrievalMode.own_scorer``); "random" and
            "recent" are the chance and recency baselines (see
            ``mosaic_core.engine.scorers``).
        keyframes_per_cluster: JPEG thumbnails kept per cluster (first, most central, last; see
            ``mosaic_core.engine.keyframes``); 0 keeps none.
        keyframe_long_side_px: a thumbnail's longer side, in pixels (never larger than the frame).
        keyframe_jpeg_quality: JPEG quality of the thumbnails, 1-95.
        keyframe_encode_threads: threads that encode sealed clusters' JPEGs, so the engine thread does not (0:
            the engine thread encodes them as each cluster seals).
    """

    mode: RetrievalMode = RetrievalMode.CLUSTER
    target_tokens_per_frame: int = 128
    page_tokens: int | None = None
    local_window_tokens: int = 1024
    max_frames_per_pass: int = 1
    retrieval_budget_tokens: int = 4096
    device_budget_bytes: int = 2 * GIB
    host_budget_bytes: int = 16 * GIB
    pinned_host_bytes: int = 0
    disk_budget_bytes: int = 0
    history_budget_bytes: int = 0
    disk_dir: str | None = None
    data_dir: str | None = None
    retired_ids_dir: str | None = None
    durable_writers: int = 4
    durable_pending_bytes: int = 4 * GIB
    eviction_policy: str = "lru"
    host_copy_below_device_free: float = 0.25
    prefetch_after_layer: int | None = 1
    rescore_every_tokens: int = 0
    decode_graphs: bool = True
    prefill_graphs: bool = True
    anchor_graphs: bool = True
    prefill_graph_layers: int = 4
    staging_copy: str = "dma"
    staging_groups: tuple[int, ...] = (8, 8, 6, 4)
    staging_streams: int = 1
    staging_batch: bool = True
    tower_stream: bool = False
    max_question_tokens: int = 512
    max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT
    evidence_spans: int = 5
    merge_min_questions: int = 3
    merge_min_joint_fraction: float = 0.8
    formation: FormationConfig = field(default_factory=FormationConfig)
    scorer: str | None = None
    keyframes_per_cluster: int = 3
    keyframe_long_side_px: int = 160
    keyframe_jpeg_quality: int = 75
    keyframe_encode_threads: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", RetrievalMode.parse(self.mode))
        self._check_sizes()
        self._check_budget_dependencies()
        self._check_fetching_and_staging()
        if self.scorer is not None and self.scorer not in SCORER_NAMES:
            raise UnknownPolicyError(f"unknown scorer {self.scorer!r}; valid scorers are: {', '.join(SCORER_NAMES)}")
        self._check_keyframes()
        if not 0.0 < self.merge_min_joint_fraction <= 1.0:
            raise ConfigError(f"merge_min_joint_fraction must be in (0, 1], got {self.merge_min_joint_fraction}")

    def _check_sizes(self) -> None:
        """Counts, budgets and sizes: each in its range."""
        positive = {
            "target_tokens_per_frame": self.target_tokens_per_frame,
            "local_window_tokens": self.local_window_tokens,
            "max_frames_per_pass": self.max_frames_per_pass,
            "retrieval_budget_tokens": self.retrieval_budget_tokens,
            "device_budget_bytes": self.device_budget_bytes,
            "host_budget_bytes": self.host_budget_bytes,
            "max_question_tokens": self.max_question_tokens,
            "max_new_tokens_limit": self.max_new_tokens_limit,
            "evidence_spans": self.evidence_spans,
            "prefill_graph_layers": self.prefill_graph_layers,
            "staging_streams": self.staging_streams,
            "durable_writers": self.durable_writers,
            "durable_pending_bytes": self.durable_pending_bytes,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if not 0 <= self.pinned_host_bytes <= self.host_budget_bytes:
            raise ConfigError(
                f"pinned_host_bytes must be in 0..host_budget_bytes={self.host_budget_bytes}, "
                f"got {self.pinned_host_bytes}"
            )
        if self.page_tokens is not None and self.page_tokens <= 0:
            raise ConfigError(f"page_tokens must be positive or None, got {self.page_tokens}")
        if self.disk_budget_bytes < 0 or self.rescore_every_tokens < 0:
            raise ConfigError(
                f"disk_budget_bytes and rescore_every_tokens must be >= 0, got "
                f"{self.disk_budget_bytes} and {self.rescore_every_tokens}"
            )

    def _check_budget_dependencies(self) -> None:
        """Settings that hold only with others: a disk or history budget needs its directory, and a cluster fits in one
        retrieval."""
        if self.disk_budget_bytes > 0 and not (self.disk_dir or self.data_dir):
            raise ConfigError(f"disk_budget_bytes={self.disk_budget_bytes} needs disk_dir to be set")
        if self.history_budget_bytes < 0 or (self.history_budget_bytes > 0 and not self.data_dir):
            raise ConfigError(
                f"history_budget_bytes must be >= 0, and needs data_dir when set; got {self.history_budget_bytes} "
                f"with data_dir={self.data_dir!r}"
            )
        if self.formation.max_tokens > self.retrieval_budget_tokens:
            raise ConfigError(
                f"formation.max_tokens={self.formation.max_tokens} exceeds retrieval_budget_tokens="
                f"{self.retrieval_budget_tokens}: a cluster must fit in one retrieval"
            )

    def _check_fetching_and_staging(self) -> None:
        """The settings of fetching clusters and staging them into the device tier."""
        if self.prefetch_after_layer is not None and self.prefetch_after_layer < 0:
            raise ConfigError(f"prefetch_after_layer must be >= 0 or None, got {self.prefetch_after_layer}")
        if any(not isinstance(n, int) or n <= 0 for n in self.staging_groups):
            raise ConfigError(f"staging_groups must be positive layer counts, got {self.staging_groups!r}")
        if not 0 <= self.host_copy_below_device_free <= 1:
            raise ConfigError(
                f"host_copy_below_device_free must be a share in 0..1, got {self.host_copy_below_device_free}"
            )
        if self.staging_copy not in ("kernel", "dma"):
            raise ConfigError(f"staging_copy must be 'kernel' or 'dma', got {self.staging_copy!r}")

    def _check_keyframes(self) -> None:
        """The settings of keeping and encoding sealed clusters' keyframes."""
        if not (isinstance(self.keyframes_per_cluster, int) and 0 <= self.keyframes_per_cluster <= 16):
            raise ConfigError(f"keyframes_per_cluster must be an int in 0..16, got {self.keyframes_per_cluster!r}")
        if not (isinstance(self.keyframe_long_side_px, int) and 16 <= self.keyframe_long_side_px <= 1024):
            raise ConfigError(f"keyframe_long_side_px must be an int in 16..1024, got {self.keyframe_long_side_px!r}")
        if not (isinstance(self.keyframe_jpeg_quality, int) and 1 <= self.keyframe_jpeg_quality <= 95):
            raise ConfigError(f"keyframe_jpeg_quality must be an int in 1..95, got {self.keyframe_jpeg_quality!r}")
        if not (isinstance(self.keyframe_encode_threads, int) and 0 <= self.keyframe_encode_threads <= 8):
            raise ConfigError(f"keyframe_encode_threads must be an int in 0..8, got {self.keyframe_encode_threads!r}")
