"""Small result types at the engine's boundary: ids, counts, spans and timings, no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class FrameInput:
    """One frame for ``Engine.ingest``: RGB ``[H, W, 3]`` uint8 at ``timestamp_s`` (seconds, any epoch)."""

    stream_id: str
    timestamp_s: float
    rgb: np.ndarray


@dataclass(slots=True)
class IngestResult:
    """What one ingest call did, and where its host time went. Device work is asynchronous: ``encode_s`` and
    ``issue_s`` are the host's time to queue the vision tower and the language model, ``wait_s`` the time it then
    waited for the device (for the tower's output when formation compares pictures alone, else for the whole pass),
    and ``place_s`` the time it spent placing frames into clusters after that. With ingest pauses, ``issue_s``
    includes the time spent serving at them. ``encoded_ahead``: the tower was queued before the call
    (``Engine.encode_ahead``), so ``encode_s`` holds none of it. ``held_back``: per stream, why frames of its window
    found no room in any tier to leave it; they stay there, KV kept, and ``refused`` counts the stream's last frames
    of the call that were therefore not taken in (``num_frames`` counts those that were)."""

    num_frames: int
    num_forward_passes: int
    num_clusters_opened: int
    encode_s: float
    prefill_s: float  # everything after the vision tower: issue_s + wait_s + place_s + bookkeeping between them
    attended_tokens_per_frame: list[int]
    issue_s: float = 0.0
    wait_s: float = 0.0
    place_s: float = 0.0
    encoded_ahead: bool = False
    refused: dict[str, int] = field(default_factory=dict)
    held_back: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class WarmUpResult:
    """What ``Engine.warm_up`` did: the questions it asked, whether it ingested its pass of blank frames (False
    when it was not asked to, or the device budget could not hold the scratch streams' windows), the counts of
    answers it decoded together, and whether its questions had a cluster to retrieve (False when it did not ingest,
    or no blank frame left the window)."""

    questions: int
    ingested: bool
    decode_batches: tuple[int, ...] = ()
    with_history: bool = False


@dataclass(slots=True)
class EvidenceSpan:
    """A retrieved cluster the answer drew on, with its time span. Rank 1 is the strongest."""

    stream_id: str
    cluster_id: str
    start_s: float
    end_s: float
    score: float
    rank: int
    keyframe_ids: list[str] = field(default_factory=list)  # the cluster's keyframes inside [start_s, end_s]


@dataclass(slots=True)
class RetrievalStats:
    num_clusters_retrieved: int = 0
    num_tokens_retrieved: int = 0
    num_layers_scored: int = 0  # layers that chose with their own queries; the rest reused an earlier choice
    bytes_fetched: int = 0
    num_copies: int = 0
    device_hits: int = 0
    device_lookups: int = 0
    transfer_s: float = 0.0  # device time of the gathers that copied retrieved KV (CUDA only)
    # the same by part, "choosing" and "shared" (``Retriever.transfer_parts``; re-scores while decoding included):
    # (bytes, seconds, copy seconds, copies handed to CUDA)
    transfer_parts: dict[str, tuple[int, float, float, int]] = field(default_factory=dict)
    attention_recall: float | None = None  # at the question's prefill (measure_recall only)
    decode_attention_recall: float | None = None  # over the decode steps, with the clusters then in use


@dataclass(slots=True)
class AnswerTimings:
    """Seconds per stage. ``time_to_first_token_s`` runs from when the engine was asked; ``setup_s`` (choosing the
    candidate clusters, building the retriever and the question's plan and device room) and ``retrieval_s`` =
    ``score_s`` + ``fetch_s`` (in the question's prefill) are parts of it."""

    retrieval_s: float = 0.0
    score_s: float = 0.0
    fetch_s: float = 0.0
    # Until session 27 the time to first token started after the set-up, which it now includes (bench/NOTES.md).
    setup_s: float = 0.0
    time_to_first_token_s: float = 0.0
    # CUDA only: from when the GPU reached the question's first kernel to its first token. The time to first token
    # less this and the set-up is what the question waited for work queued before it (an ingest pass) and for its
    # own launches.
    first_token_device_s: float | None = None
    decode_s: float = 0.0
    num_tokens: int = 0
    # Set by whoever queued the question for the engine (the service's engine loop): how long it waited there
    # before the engine began it. 0 for a question asked of the engine directly.
    start_wait_s: float = 0.0
    # Set by the service's worker: from the call's arrival to the call's thread taking the first token, to hand it
    # to Ray for the router (start_wait_s and time_to_first_token_s are parts of it), and of that, from the engine
    # thread's handing the first token over to the call's thread taking it. 0 for a question asked of the engine
    # directly.
    worker_first_token_s: float = 0.0
    token_handoff_s: float = 0.0
    # Set by the router: its call to the worker until the first token came back, less worker_first_token_s.
    transport_s: float = 0.0

    @property
    def decode_s_per_token(self) -> float:
        return self.decode_s / max(1, self.num_tokens - 1)


@dataclass(slots=True)
class TokenEvent:
    """One streamed piece of the answer."""

    token_id: int
    text: str


@dataclass(slots=True)
class Answer:
    """The finished answer, after every ``TokenEvent``."""

    stream_id: str
    question: str
    text: str
    token_ids: list[int]
    evidence: list[EvidenceSpan]
    timings: AnswerTimings
    retrieval: RetrievalStats
    last_hidden: object = field(default=None, repr=False)  # torch tensor, kept for fidelity checks


@dataclass(slots=True)
class ClusterInfo:
    cluster_id: str
    stream_id: str
    start_s: float
    end_s: float
    first_frame: int
    last_frame: int
    num_tokens: int
    num_bytes: int
    tier: str


@dataclass(slots=True)
class StreamStats:
    stream_id: str
    fps: float
    frames_ingested: int
    first_timestamp_s: float | None
    last_timestamp_s: float | None
    num_clusters: int
    clusters_by_tier: dict[str, int]
    bytes_by_tier: dict[str, int]
    local_window_tokens: int
    sink_tokens: int
    tokens_per_frame: int | None
    closed: bool


# ``EngineStats.allocator_events``' names, and the keys of ``torch.cuda.memory_stats`` they read.
ALLOCATOR_EVENTS = {
    "retries": "num_alloc_retries",
    "device_mallocs": "num_device_alloc",
    "device_frees": "num_device_free",
    "ooms": "num_ooms",
}


@dataclass(slots=True)
class EngineStats:
    mode: str
    num_streams: int
    used_bytes_by_tier: dict[str, int]
    capacity_bytes_by_tier: dict[str, int]
    clusters_by_tier: dict[str, int]
    transfer_bytes_by_direction: dict[str, int]
    transfer_copies_by_direction: dict[str, int]
    device_hit_ratio: float
    # The device page pool's own size: every KV byte the engine keeps on the device (sink, windows, clusters,
    # questions' staged and own pages) is inside it. Equal to the device budget, rounded down to whole pages,
    # except in full mode, whose pool doubles when it runs out.
    device_pool_bytes: int = 0
    # JPEG thumbnails held for the streams' clusters (in host memory, charged to the host budget), and the ones
    # not kept because the host tier could not make room for them, since the engine started (closed streams' too).
    keyframe_bytes: int = 0
    num_keyframes: int = 0
    keyframes_dropped: int = 0
    # The CUDA caching allocator's counts on the engine's device since the process started (``ALLOCATOR_EVENTS``);
    # empty off CUDA. A retry is a device allocation that failed, so the allocator gave its cached blocks back, which
    # waits for all of the device's work, and tried again.
    allocator_events: dict[str, int] = field(default_factory=dict)
    # Variants of Mosaic's own Triton kernels compiled in this process (``mosaic_core.kernels.compiles``), each a
    # stall of about a second for whatever launched it; None where they are not counted (off CUDA).
    kernel_compiles: int | None = None
    # How the host page pool grew since the engine started (``mosaic_core.memory.host_growth.HostGrowth``): chunks
    # made ahead on a thread of their own, chunks allocated on the engine thread (up front, or by a take that found
    # none made), and the seconds the engine thread spent allocating chunks or waiting for one being made.
    host_chunks_ahead: int = 0
    host_chunks_sync: int = 0
    host_grow_wait_s: float = 0.0
    # Host memory the host page pool holds now (pinned under CUDA), the chunk made ahead included once it is made: a
    # CUDA engine makes its first chunk as it starts, before any cluster leaves the device.
    host_pool_bytes: int = 0
