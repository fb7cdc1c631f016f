"""Prometheus metrics of each stream's ingest (``StreamMetrics``), on the registry ``MosaicMetrics`` owns.

Cardinality is bounded on purpose: the first ``max_stream_labels`` streams get their own ``stream`` value; later
ones share ``_other``. For ``_other`` the queue-depth gauge reports the sum over those streams and the lag gauge the
maximum, so the overflow bucket still answers "how much is queued" and "how far behind is the worst stream".
``forget_stream`` drops a deleted stream's series and frees its slot for the next new stream.
"""

from __future__ import annotations

import contextlib
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.metric_checks import check_label, non_negative

STREAM_OTHER = "_other"
DEFAULT_MAX_STREAM_LABELS = 64
DROP_REASONS = ("queue_full", "no_room", "decode_error", "invalid", "stream_deleted", "shutdown")


class StreamMetrics:
    """Frames received, ingested and dropped, queue depth and lag, by stream, with the bounded ``stream`` label.

    Args:
        r: where the metrics are registered.
        max_stream_labels: streams that get their own ``stream`` label value before ``_other``.
    """

    def __init__(self, r: CollectorRegistry, *, max_stream_labels: int = DEFAULT_MAX_STREAM_LABELS) -> None:
        if max_stream_labels < 0:
            raise ValueError(f"max_stream_labels={max_stream_labels} must be >= 0")
        self.max_stream_labels = max_stream_labels
        self._lock = threading.Lock()
        self._stream_labels: set[str] = set()
        self._overflow_depth: dict[str, int] = {}
        self._overflow_lag_s: dict[str, float] = {}
        self._overflow: set[str] = set()
        self.frames_received_total = Counter(
            "mosaic_frames_received_total", "Frames accepted from clients or sources.", ["stream"], registry=r
        )
        self.frames_ingested_total = Counter(
            "mosaic_frames_ingested_total", "Frames encoded into the KV cache.", ["stream"], registry=r
        )
        self.frames_dropped_total = Counter(
            "mosaic_frames_dropped_total", "Frames dropped, by reason.", ["stream", "reason"], registry=r
        )
        self.ingest_queue_depth = Gauge(
            "mosaic_ingest_queue_depth",
            "Frames waiting in the stream's bounded ingest queue.",
            ["stream"],
            registry=r,
        )
        self.stream_lag_seconds = Gauge(
            "mosaic_stream_lag_seconds",
            "Seconds the stream's oldest frame still waiting for ingest has waited (0 with none waiting, a stopped "
            "or failed source included; a silent worker's streams: growing from its last report).",
            ["stream"],
            registry=r,
        )

    def stream_label(self, stream_id: str) -> str:
        """The ``stream`` label value for ``stream_id``: itself while slots last, else ``_other``."""
        with self._lock:
            return self._stream_label_locked(stream_id)

    def _stream_label_locked(self, stream_id: str) -> str:
        if stream_id in self._stream_labels:
            return stream_id
        if stream_id in self._overflow or stream_id == STREAM_OTHER:
            return STREAM_OTHER
        if len(self._stream_labels) < self.max_stream_labels:
            self._stream_labels.add(stream_id)
            return stream_id
        self._overflow.add(stream_id)
        return STREAM_OTHER

    def forget_stream_gauges(self, stream_id: str) -> None:
        """Drops a stream's lag and queue-depth series, or its share of ``_other``'s (no worker reports them any
        more); its counters and its label stay."""
        with self._lock:
            if stream_id in self._stream_labels:
                for metric in (self.ingest_queue_depth, self.stream_lag_seconds):
                    with contextlib.suppress(KeyError):  # a series never set
                        metric.remove(stream_id)
            elif stream_id in self._overflow:
                self._drop_overflow_share(stream_id)

    def forget_stream(self, stream_id: str) -> None:
        """Drops a deleted stream's own series (or its share of ``_other``) and frees its label slot."""
        with self._lock:
            if stream_id in self._stream_labels:
                self._stream_labels.discard(stream_id)
                for metric in (
                    self.frames_received_total,
                    self.frames_ingested_total,
                    self.ingest_queue_depth,
                    self.stream_lag_seconds,
                ):
                    metric.remove(stream_id)
                for reason in DROP_REASONS:
                    self.frames_dropped_total.remove(stream_id, reason)
            elif stream_id in self._overflow:
                # Counters of _other keep their totals; only the gauges' aggregates lose this stream.
                self._overflow.discard(stream_id)
                self._drop_overflow_share(stream_id)

    def _drop_overflow_share(self, stream_id: str) -> None:
        self._overflow_depth.pop(stream_id, None)
        self._overflow_lag_s.pop(stream_id, None)
        self._publish_overflow_gauges()

    def _publish_overflow_gauges(self) -> None:
        self.ingest_queue_depth.labels(STREAM_OTHER).set(sum(self._overflow_depth.values()))
        self.stream_lag_seconds.labels(STREAM_OTHER).set(max(self._overflow_lag_s.values(), default=0.0))

    def frame_received(self, stream_id: str, n: int = 1) -> None:
        self.frames_received_total.labels(self.stream_label(stream_id)).inc(n)

    def frames_ingested(self, stream_id: str, n: int) -> None:
        self.frames_ingested_total.labels(self.stream_label(stream_id)).inc(n)

    def frame_dropped(self, stream_id: str, reason: str, n: int = 1) -> None:
        check_label("reason", reason, DROP_REASONS)
        self.frames_dropped_total.labels(self.stream_label(stream_id), reason).inc(n)

    def set_ingest_queue_depth(self, stream_id: str, n: int) -> None:
        non_negative("ingest queue depth", n)
        with self._lock:
            label = self._stream_label_locked(stream_id)
            if label == STREAM_OTHER:
                self._overflow_depth[stream_id] = n
                self._publish_overflow_gauges()
            else:
                self.ingest_queue_depth.labels(label).set(n)

    def set_stream_lag(self, stream_id: str, s: float) -> None:
        # Lag may be briefly negative when a camera clock runs ahead; it is reported as it is.
        with self._lock:
            label = self._stream_label_locked(stream_id)
            if label == STREAM_OTHER:
                self._overflow_lag_s[stream_id] = s
                self._publish_overflow_gauges()
            else:
                self.stream_lag_seconds.labels(label).set(s)

    def prime(self) -> None:
        """Creates the ``_other`` series of every family (``MosaicMetrics.prime`` says why)."""
        for metric in (self.frames_received_total, self.frames_ingested_total):
            metric.labels(STREAM_OTHER)
        for reason in DROP_REASONS:
            self.frames_dropped_total.labels(STREAM_OTHER, reason)
        with self._lock:
            self._publish_overflow_gauges()
