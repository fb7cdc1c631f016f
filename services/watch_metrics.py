"""Prometheus metrics of standing questions (docs/watches.md), on the registry ``MosaicMetrics`` owns."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.metric_checks import check_label, non_negative

SEAL_TO_EVENT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
WATCH_SCORE_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
WATCH_SUPPRESS_REASONS = ("cooldown", "outside_hours")
WATCH_DROP_REASONS = ("buffer_full", "outbox_full", "answer_queue_full", "score_failed", "store_failed")
WEBHOOK_OUTCOMES = ("delivered", "retried", "failed", "dropped")


class WatchMetrics:
    """Standing questions (docs/watches.md): watches, evaluations, events, latency, drops and webhooks."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.watches = Gauge("mosaic_watches", "Standing questions (watches) defined.", registry=r)
        self.evaluations_total = Counter(
            "mosaic_watch_evaluations_total", "Sealed clusters scored against a watch (one per pair).", registry=r
        )
        self.events_total = Counter("mosaic_watch_events_total", "Watch events fired.", registry=r)
        self.suppressed_total = Counter(
            "mosaic_watch_suppressed_total", "Matches that did not fire, by reason.", ["reason"], registry=r
        )
        self.events_dropped_total = Counter(
            "mosaic_watch_events_dropped_total",
            "Watch events lost (buffer_full: trimmed from a watch's full buffer; "
            "outbox_full: dropped by a worker before the router took them; score_failed: (cluster, watch) "
            "evaluations lost because scoring raised; store_failed: taken from a worker, but the store did not confirm "
            "them and they were not sent on), or fired without an answer (answer_queue_full), by reason.",
            ["reason"],
            registry=r,
        )
        self.seal_to_event_seconds = Histogram(
            "mosaic_watch_seal_to_event_seconds",
            "Time from a cluster being seen sealed to its watch event being stored and sent.",
            buckets=SEAL_TO_EVENT_BUCKETS_S,
            registry=r,
        )
        self.score_seconds = Histogram(
            "mosaic_watch_score_seconds",
            "Engine time to score one sealed cluster against every watch on its stream.",
            buckets=WATCH_SCORE_BUCKETS_S,
            registry=r,
        )
        self.subscribers = Gauge("mosaic_watch_subscribers", "Open WatchEvents calls.", registry=r)
        self.webhook_deliveries_total = Counter(
            "mosaic_watch_webhook_deliveries_total", "Webhook attempts and their outcome.", ["outcome"], registry=r
        )

    def prime(self) -> None:
        for reason in WATCH_SUPPRESS_REASONS:
            self.suppressed_total.labels(reason)
        for reason in WATCH_DROP_REASONS:
            self.events_dropped_total.labels(reason)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_deliveries_total.labels(outcome)

    def set_watches(self, n: int) -> None:
        self.watches.set(non_negative("watches", n))

    def evaluated(self, n: int) -> None:
        self.evaluations_total.inc(non_negative("evaluations", n))

    def fired(self, seal_to_event_s: float) -> None:
        self.events_total.inc()
        self.seal_to_event_seconds.observe(max(0.0, seal_to_event_s))

    def suppressed(self, reason: str, n: int = 1) -> None:
        self.suppressed_total.labels(check_label("reason", reason, WATCH_SUPPRESS_REASONS)).inc(n)

    def dropped(self, reason: str, n: int = 1) -> None:
        self.events_dropped_total.labels(check_label("reason", reason, WATCH_DROP_REASONS)).inc(n)

    def observe_score(self, s: float) -> None:
        self.score_seconds.observe(non_negative("score seconds", s))

    def set_subscribers(self, n: int) -> None:
        self.subscribers.set(non_negative("subscribers", n))

    def webhook(self, outcome: str) -> None:
        self.webhook_deliveries_total.labels(check_label("outcome", outcome, WEBHOOK_OUTCOMES)).inc()
