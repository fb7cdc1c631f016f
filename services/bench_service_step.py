"""One step of ``mosaic bench service``: what was offered, what the service sustained, and the real-time rule.

A step is real-time only when every check of ``StepResult.failures`` passes; each names what it saw when it fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LAG_LIMIT_S = 2.0
# A source that stopped, or a pusher that fell behind, queues nothing and shows no lag: the frames must arrive.
# /metrics counts a frame received when the worker queues it, and the router learns of it at its next telemetry poll,
# so the frames counted between two scrapes are those of a window shifted at each end by up to one poll interval
# (LocalService: 0.5 s), and each camera brings whole frames (a window holds floor or ceil of its seconds x fps).
# Hence the allowance of LOAD_EDGE_FRAMES_PER_CAMERA + fps x poll interval frames per camera under 99% of nominal.
MIN_RECEIVED_SHARE = 0.99
LOAD_EDGE_FRAMES_PER_CAMERA = 1.0
# Frames arrived but not ingested: an ingest call moves up to a batch of frames at once, so at the window's edges the
# ingested count can trail the received one by a call; the backlog check below catches slow shortfalls, this one a
# service that ingests far less than arrives.
MIN_INGESTED_SHARE = 0.9
# Falling behind: the ingest backlog (every camera's queued frames) may grow over the window by at most one ingest
# call (--max-batch-frames: the depth saw-tooths by up to one call, whatever the slope's fit leaves of that) plus this
# share of the window's nominal frames. At 1 fps that share is the lag a camera may gain over the window as a share
# of its length: 2% of a 25-s window is 0.5 s, well under the 2-s limit, and a step growing faster would cross it
# within a few windows.
MAX_BACKLOG_GROWTH_SHARE = 0.02
# Questions: a schedule of a fixed period puts floor or ceil of (seconds x rate) in a window, hence one question of
# allowance under this share of the nominal count.
MIN_QUESTIONS_SENT_SHARE = 0.95


@dataclass(slots=True)
class StepResult:
    """One N: what was offered and what the service sustained."""

    cameras: int
    pulled: int
    pushed: int
    measure_s: float
    offered_fps: float  # nominal: fps x cameras
    received_fps: float | None  # frames the worker queued (mosaic_frames_received_total); None: not read
    ingested_fps: float
    lag_p50_s: float | None  # pooled over cameras and seconds
    lag_p99_s: float | None
    lag_max_s: float | None
    worst_camera_lag_p99_s: float | None  # each camera's own p99, the largest; None: some camera's lag unknown
    lag_unknown_cameras: list[str]  # cameras without a lag series in some scrape of the window
    backlog_growth_frames: float | None  # frames queued for ingest, summed over cameras, change over the window
    max_batch_frames: int  # one ingest call's frames at most (the service's max_batch_frames)
    load_edge_frames: float  # the received count's allowance for the window's edges (see MIN_RECEIVED_SHARE)
    ingest_latency_p50_s: float | None  # receipt to KV written, per frame (mosaic_ingest_latency_seconds)
    ingest_latency_p99_s: float | None
    dropped: int
    refused: int
    push_sent: int  # camera-frames in PushFrames calls during the window
    push_skipped: int  # camera-frames that fell due while a push call still ran, never sent
    push_errors: dict[str, int]
    stats_errors: dict[str, int]  # samples of /metrics the service did not answer
    questions_nominal: float  # questions_per_s x the window
    questions_sent: int  # sent in the window (by send time)
    questions_not_sent: int  # due in the window while every question client was busy
    questions_unfinished: int  # sent in the window, not finished by the bounded wait after it
    questions: int  # of those sent, answered
    question_errors: dict[str, int]  # of those sent, failed, by gRPC code
    ttft_p50_ms: float | None  # over the answered questions sent in the window
    ttft_p99_ms: float | None
    decode_ms_per_token: float | None
    server_ttft_p50_ms: float | None
    server_ttft_p99_ms: float | None
    server_decode_ms_per_token: float | None
    gpu_memory_used_mib: float | None  # the worker's (gpu_memory_source says how it was read)
    router_cpu_per_s: float | None  # the router's process alone
    worker_cpu_per_s: float | None  # the worker's process tree, its decoding processes included
    decode_cpu_per_s: float | None  # measured: the worker's decoding processes (pulled sources); None: none found
    decode_cpu_estimate_per_s: float | None  # estimated: decode cost here x the frames each kind brings
    engine_thread_share: dict[str, float]  # seconds per second of the worker's engine thread, by part
    frames_per_ingest_call: float | None
    forward_passes_per_ingest_call: float | None
    gpu_memory_source: str | None = None  # "worker processes", "the only GPU", or None
    push_by_client: list[dict[str, int]] = field(default_factory=list)  # sent and skipped per push client
    worker_gil: dict | None = None  # how late the worker's GIL probe woke (services.gil_probe.wait_share)
    settled_after_s: float | None = None  # after the warm-up, until every lag was under LAG_LIMIT_S; None: never
    engine_stacks: dict | None = None  # where the engine thread was (services.stack_probe.busiest)
    durable: dict[str, float] | None = None  # the workers' record writing, per second (durable_rates)
    tiers: dict[str, float] | None = None  # KV held and budgeted per tier, and moved (tier_summary)
    # The workers' GPU allocator events in the step, by event (engine_thread; empty off CUDA)
    allocator_events: dict[str, int] = field(default_factory=dict)
    kernel_compiles: int = 0  # variants of Mosaic's Triton kernels the workers compiled in the step (CUDA only)
    ingest_calls_encoded_ahead: float | None = None  # share of the ingest calls whose tower was queued the call before
    # Parts of the server's TTFT: waiting on the worker until the engine began the question, and the engine's
    # prefill to first token (QueryTimings.start_wait_s and engine_first_token_s)
    start_wait_p50_ms: float | None = None
    start_wait_p99_ms: float | None = None
    engine_ttft_p50_ms: float | None = None
    engine_ttft_p99_ms: float | None = None
    # Outside the engine thread: the first token's way from the engine thread to the thread that sends it
    # (QueryTimings.token_handoff_s), and between router and worker both ways (QueryTimings.transport_s)
    handoff_p50_ms: float | None = None
    handoff_p99_ms: float | None = None
    transport_p50_ms: float | None = None
    transport_p99_ms: float | None = None
    # Every answered question's TTFT and its parts in ms: client, server, start_wait, engine, worker, handoff and
    # transport (question_sample_ms)
    ttft_samples_ms: list[dict[str, float | None]] = field(default_factory=list)
    # Gaps between the engine thread's chances to start a question, by kind (start_gaps)
    question_start_gaps: dict[str, dict] = field(default_factory=dict)

    @property
    def nominal_frames(self) -> float:
        return self.offered_fps * self.measure_s

    @property
    def device_kv_gib(self) -> float | None:
        """The device tier's KV held at the step's end."""
        return (self.tiers or {}).get("used_gib:device")

    @property
    def failures(self) -> list[str]:
        """Why the step is not real-time, one phrase per failed check; empty: real-time."""
        failed = []
        if self.stats_errors:
            failed.append(f"/metrics unread {sum(self.stats_errors.values())}x")
        if self.lag_unknown_cameras:
            failed.append(f"lag unknown for {len(self.lag_unknown_cameras)} cameras")
        if self.lag_p99_s is None or self.lag_p99_s >= LAG_LIMIT_S:
            failed.append(f"lag p99 {_s(self.lag_p99_s)}")
        if self.worst_camera_lag_p99_s is None or self.worst_camera_lag_p99_s >= LAG_LIMIT_S:
            failed.append(f"worst camera's lag p99 {_s(self.worst_camera_lag_p99_s)}")
        received = None if self.received_fps is None else self.received_fps * self.measure_s
        if received is None or received < MIN_RECEIVED_SHARE * self.nominal_frames - self.load_edge_frames:
            failed.append(f"load short ({_n(received)} of {self.nominal_frames:.0f} frames received)")
        if self.ingested_fps < MIN_INGESTED_SHARE * self.offered_fps:
            failed.append(f"ingest short ({self.ingested_fps:.1f} of {self.offered_fps:.1f} frames/s)")
        limit = self.max_batch_frames + MAX_BACKLOG_GROWTH_SHARE * self.nominal_frames
        if self.backlog_growth_frames is None or self.backlog_growth_frames > limit:
            failed.append(f"falling behind (backlog {_n(self.backlog_growth_frames, '+')} frames, limit +{limit:.0f})")
        if self.dropped or self.refused:
            failed.append(f"{self.dropped} dropped, {self.refused} refused")
        if self.push_errors:
            failed.append(f"push errors {self.push_errors}")
        if self.questions_sent < MIN_QUESTIONS_SENT_SHARE * self.questions_nominal - 1:
            failed.append(f"questions short ({self.questions_sent} of {self.questions_nominal:.0f} sent)")
        if self.question_errors:
            failed.append(f"questions failed {self.question_errors}")
        if self.questions_unfinished:
            failed.append(f"{self.questions_unfinished} questions unfinished")
        return failed

    @property
    def real_time(self) -> bool:
        return not self.failures


def _s(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2f} s"


def _n(value: float | None, sign: str = "") -> str:
    return "unknown" if value is None else f"{value:{sign}.0f}"
