"""Prometheus metrics of the Mosaic service (the names and labels of SERVICE_SPEC.md, kept exactly).

One ``MosaicMetrics`` object owns every metric on an injected ``CollectorRegistry`` (a fresh one by default,
never the process-global registry, so tests and several servers in one process do not collide). The
router and the workers call its small methods and those of its families of metrics (``streams``: ``StreamMetrics``;
``engine_loop``: ``EngineLoopMetrics``; ``memory``: ``MemoryMetrics``; ``durability``: ``DurabilityMetrics``;
``watches``: ``WatchMetrics``), each on that registry; nothing else in the code base touches prometheus_client.

Cardinality is bounded on purpose:
- ``stream``: the first ``max_stream_labels`` streams get their own value; later ones share ``_other``
  (``services.stream_metrics``).
- ``worker`` is the worker index ("0", "1", ...); enum-like labels (``reason``, ``outcome``, ``mode``,
  ``direction``, ``tier``, ``code``) accept only their listed values and raise ``ValueError`` otherwise.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mosaic_core.config import RetrievalMode
from services.durability_metrics import DurabilityMetrics
from services.engine_loop_metrics import EngineLoopMetrics
from services.memory_metrics import MemoryMetrics
from services.metric_checks import check_label, non_negative, worker_label
from services.stream_metrics import DEFAULT_MAX_STREAM_LABELS, StreamMetrics
from services.watch_metrics import WatchMetrics

# "cancelled": the client went away before its answer ended (not an error of the server).
QUERY_OUTCOMES = ("ok", "error", "rejected", "deadline", "cancelled")
MODES = tuple(mode.value for mode in RetrievalMode)  # every mode the service may run
# Every gRPC status code an RPC can fail with (OK is not an error).
ERROR_CODES = (
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)

# Latency buckets in seconds. TTFT targets are tens of ms, decode steps single ms, ingest up to seconds; ingest's
# are finer around the 2-s real-time limit, where mosaic bench service interpolates its p50 and p99 within buckets.
INGEST_LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_FRAMES_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TTFT_BUCKETS_S = (0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
INTER_TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)
RETRIEVAL_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(slots=True)
class MetricsServer:
    """A running /metrics HTTP endpoint; ``close()`` stops it and frees the port."""

    httpd: WSGIServer
    thread: threading.Thread
    closed: bool = field(default=False, init=False)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def close(self) -> None:
        """Stops serving; calling it again does nothing."""
        if self.closed:
            return
        self.closed = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class MosaicMetrics:
    """Every Mosaic metric, with validated, bounded labels.

    Args:
        registry: where the metrics are registered; a new private registry if None.
        max_stream_labels: streams that get their own ``stream`` label value before ``_other``.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, max_stream_labels: int = DEFAULT_MAX_STREAM_LABELS
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.streams = StreamMetrics(r, max_stream_labels=max_stream_labels)
        self._add_ingest(r)
        self.engine_loop = EngineLoopMetrics(r)
        self._add_questions(r)
        self.memory = MemoryMetrics(r)
        self._add_service(r)
        self.durability = DurabilityMetrics(r)
        self.watches = WatchMetrics(r)

    def _add_ingest(self, r: CollectorRegistry) -> None:
        self.ingest_latency_seconds = Histogram(
            "mosaic_ingest_latency_seconds",
            "Time from frame receipt to KV written.",
            ["worker"],
            buckets=INGEST_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.ingest_batch_frames = Histogram(
            "mosaic_ingest_batch_frames",
            "Frames per cross-stream ingest batch.",
            ["worker"],
            buckets=BATCH_FRAMES_BUCKETS,
            registry=r,
        )
        self.ingest_forward_passes_total = Counter(
            "mosaic_ingest_forward_passes_total",
            "Language-model forward passes of ingest calls: one a call while every call holds one row per stream.",
            ["worker"],
            registry=r,
        )
        self.ingest_calls_encoded_ahead_total = Counter(
            "mosaic_ingest_calls_encoded_ahead_total",
            "Ingest calls whose vision tower was queued as the call before returned (encode_ahead).",
            ["worker"],
            registry=r,
        )

    def _add_questions(self, r: CollectorRegistry) -> None:
        self.query_queue_depth = Gauge(
            "mosaic_query_queue_depth", "Questions waiting in the router's bounded queue.", registry=r
        )
        self.queries_running = Gauge(
            "mosaic_queries_running",
            "Questions the router's queue lets run now (at most query_concurrency), answering or being answered.",
            registry=r,
        )
        self.queries_total = Counter("mosaic_queries_total", "Questions finished, by outcome.", ["outcome"], registry=r)
        self.time_to_first_token_seconds = Histogram(
            "mosaic_time_to_first_token_seconds",
            "Question received to first answer token.",
            ["mode"],
            buckets=TTFT_BUCKETS_S,
            registry=r,
        )
        self.inter_token_latency_seconds = Histogram(
            "mosaic_inter_token_latency_seconds",
            "Gap between answer tokens.",
            ["mode"],
            buckets=INTER_TOKEN_BUCKETS_S,
            registry=r,
        )
        self.retrieval_latency_seconds = Histogram(
            "mosaic_retrieval_latency_seconds",
            "Scoring and fetching clusters for one question.",
            ["mode"],
            buckets=RETRIEVAL_BUCKETS_S,
            registry=r,
        )

    def _add_service(self, r: CollectorRegistry) -> None:
        self.active_streams = Gauge("mosaic_active_streams", "Open streams.", registry=r)
        self.workers_up = Gauge("mosaic_workers_up", "Live worker actors.", registry=r)
        self.workers_gone = Gauge(
            "mosaic_workers_gone",
            "Worker actors Ray will not restart again (dead past their restarts, or a restart failed to start): their "
            "streams are served again only once the router restarts. They do not count in mosaic_workers_up.",
            registry=r,
        )
        self.workers_starting = Gauge(
            "mosaic_workers_starting",
            "Worker actors the router is still waiting for as it starts (loading the model, capturing graphs, "
            "restoring streams), for as long as each makes progress (worker_start_timeout_s bounds a worker's "
            "silence); 0 once every one answered, or once it gave up on them and stops.",
            registry=r,
        )
        self.errors_total = Counter(
            "mosaic_errors_total", "Errors returned, by gRPC status code name.", ["code"], registry=r
        )

    # --- ingest ------------------------------------------------------------------------------------

    def observe_ingest_latency(self, worker: int | str, s: float) -> None:
        self.ingest_latency_seconds.labels(worker_label(worker)).observe(non_negative("ingest latency", s))

    def observe_ingest_batch(self, worker: int | str, n: int) -> None:
        self.ingest_batch_frames.labels(worker_label(worker)).observe(non_negative("batch frames", n))

    def add_ingest_forward_passes(self, worker: int | str, n: int) -> None:
        self.ingest_forward_passes_total.labels(worker_label(worker)).inc(non_negative("forward passes", n))

    def add_ingest_calls_encoded_ahead(self, worker: int | str, n: int) -> None:
        self.ingest_calls_encoded_ahead_total.labels(worker_label(worker)).inc(non_negative("calls", n))

    # --- questions ---------------------------------------------------------------------------------

    def set_query_queue_depth(self, n: int) -> None:
        self.query_queue_depth.set(non_negative("query queue depth", n))

    def set_queries_running(self, n: int) -> None:
        self.queries_running.set(non_negative("questions running", n))

    def query_finished(self, outcome: str) -> None:
        self.queries_total.labels(check_label("outcome", outcome, QUERY_OUTCOMES)).inc()

    def observe_ttft(self, mode: str, s: float) -> None:
        self.time_to_first_token_seconds.labels(check_label("mode", mode, MODES)).observe(non_negative("ttft", s))

    def observe_inter_token(self, mode: str, s: float) -> None:
        mode = check_label("mode", mode, MODES)
        self.inter_token_latency_seconds.labels(mode).observe(non_negative("inter-token latency", s))

    def observe_retrieval(self, mode: str, s: float) -> None:
        mode = check_label("mode", mode, MODES)
        self.retrieval_latency_seconds.labels(mode).observe(non_negative("retrieval latency", s))

    def forget_worker(self, worker: int | str) -> None:
        """Drops the series of a worker that stopped answering: its gauges would otherwise freeze at their last
        values. Its engine counters and histograms go too and start again from 0 when it answers (a reset, to
        Prometheus); its dropped keyframes and its durability counters stay."""
        label = worker_label(worker)
        for metric in (
            self.ingest_latency_seconds, self.ingest_batch_frames, self.ingest_forward_passes_total,
            self.ingest_calls_encoded_ahead_total,
        ):  # fmt: skip
            with contextlib.suppress(KeyError):  # a series never set
                metric.remove(label)
        self.memory.forget_worker(worker)
        self.engine_loop.forget_worker(worker)
        self.durability.forget_worker(worker)

    # --- service -----------------------------------------------------------------------------------

    def set_active_streams(self, n: int) -> None:
        self.active_streams.set(non_negative("active streams", n))

    def set_workers_up(self, n: int) -> None:
        self.workers_up.set(non_negative("workers up", n))

    def set_workers_gone(self, n: int) -> None:
        self.workers_gone.set(non_negative("workers gone", n))

    def set_workers_starting(self, n: int) -> None:
        self.workers_starting.set(non_negative("workers starting", n))

    def error(self, code_name: str) -> None:
        self.errors_total.labels(check_label("code", code_name, ERROR_CODES)).inc()

    # --- exposition --------------------------------------------------------------------------------

    def prime(self, worker_ids: tuple[int | str, ...] = ("0",)) -> None:
        """Creates a zero-valued series in every family, so a fresh scrape lists every metric.

        Enum-labelled families get every value; stream families get ``_other``; worker families get
        ``worker_ids``, but ``mosaic_metadata_store_up`` (``DurabilityMetrics.prime_worker`` says why). Priming never
        changes a value that is already there.
        """
        self.streams.prime()
        for outcome in QUERY_OUTCOMES:
            self.queries_total.labels(outcome)
        for mode in MODES:
            for metric in (
                self.time_to_first_token_seconds,
                self.inter_token_latency_seconds,
                self.retrieval_latency_seconds,
            ):
                metric.labels(mode)
        for code in ERROR_CODES:
            self.errors_total.labels(code)
        for worker in map(worker_label, worker_ids):
            self.ingest_latency_seconds.labels(worker)
            self.ingest_batch_frames.labels(worker)
            self.ingest_forward_passes_total.labels(worker)
            self.ingest_calls_encoded_ahead_total.labels(worker)
            self.memory.prime_worker(worker)
            self.engine_loop.prime_worker(worker)
            self.durability.prime_worker(worker)
        self.watches.prime()

    def scrape(self) -> str:
        """The registry in the Prometheus text format, as the HTTP endpoint serves it."""
        return prometheus_client.generate_latest(self.registry).decode()

    def start_http_server(self, port: int, addr: str = "127.0.0.1") -> MetricsServer:
        """Serves the registry at ``http://addr:port/metrics`` from a daemon thread (port 0: any free one)."""
        httpd, thread = prometheus_client.start_http_server(port, addr=addr, registry=self.registry)
        return MetricsServer(httpd=httpd, thread=thread)
