"""Prometheus metrics of a worker's engine thread (``EngineLoopMetrics``): where its time goes, and how long questions
wait for a chance to start; on the registry ``MosaicMetrics`` owns."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Histogram

from services.metric_checks import check_label, non_negative, worker_label

# Where a worker's engine thread spends its time: engine.ingest calls; what follows each ingest call (tier sync,
# retention, watch evaluation); starting and stepping answers; commands and stats; waiting for work.
ENGINE_LOOP_PARTS = ("ingest", "ingest_upkeep", "questions", "other", "idle")
# Where the engine thread may start a new question: a pause inside an ingest call, the start of an ingest call (its
# frames taken, before their preparation), its end (before its upkeep), and the loop's own start of questions between
# calls. A question's wait for the engine is at most the gap between two of them; QUESTION_START_GAPS names each gap by
# the chances at its two ends.
QUESTION_START_CHANCES = ("pause", "call_start", "call_end", "loop")
QUESTION_START_GAPS = tuple(f"{a}_to_{b}" for a in QUESTION_START_CHANCES for b in QUESTION_START_CHANCES)
QUESTION_START_GAP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class EngineLoopMetrics:
    """Each worker's engine-thread seconds by part, gaps between its chances to start a question, and waits for an
    answer thread."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.engine_loop_seconds_total = Counter(
            "mosaic_engine_loop_seconds_total",
            "Seconds a worker's engine thread spent, by part (ingest, ingest_upkeep, questions, other, idle).",
            ["worker", "part"],
            registry=r,
        )
        self.question_start_gap_seconds = Histogram(
            "mosaic_question_start_gap_seconds",
            "Time between two chances of a worker's engine thread to start a new question, by the chances at its "
            "ends (pause: inside an ingest call; call_start: at its start, before its frames are prepared; "
            "call_end: after one, before its upkeep; loop: between calls).",
            ["worker", "between"],
            buckets=QUESTION_START_GAP_BUCKETS_S,
            registry=r,
        )
        self.answer_thread_wait_seconds = Histogram(
            "mosaic_answer_thread_wait_seconds",
            "Time from the router's sending of an ask to one of the worker's answer threads (answer_threads) taking "
            "it; asks beyond that many at once wait, within their deadline.",
            ["worker"],
            buckets=QUESTION_START_GAP_BUCKETS_S,
            registry=r,
        )

    def add_engine_loop_seconds(self, worker: int | str, part: str, seconds: float) -> None:
        check_label("part", part, ENGINE_LOOP_PARTS)
        self.engine_loop_seconds_total.labels(worker_label(worker), part).inc(non_negative("seconds", seconds))

    def observe_question_start_gap(self, worker: int | str, between: str, s: float) -> None:
        check_label("between", between, QUESTION_START_GAPS)
        self.question_start_gap_seconds.labels(worker_label(worker), between).observe(non_negative("gap", s))

    def observe_answer_thread_wait(self, worker: int | str, s: float) -> None:
        self.answer_thread_wait_seconds.labels(worker_label(worker)).observe(non_negative("answer thread wait", s))

    def prime_worker(self, worker: str) -> None:
        self.answer_thread_wait_seconds.labels(worker)
        for part in ENGINE_LOOP_PARTS:
            self.engine_loop_seconds_total.labels(worker, part)
        for between in QUESTION_START_GAPS:
            self.question_start_gap_seconds.labels(worker, between)

    def forget_worker(self, worker: int | str) -> None:
        """Drops every series of a worker that left."""
        label = worker_label(worker)
        with contextlib.suppress(KeyError):  # a series never set
            self.answer_thread_wait_seconds.remove(label)
        for part in ENGINE_LOOP_PARTS:
            with contextlib.suppress(KeyError):  # a part never timed
                self.engine_loop_seconds_total.remove(label, part)
        for between in QUESTION_START_GAPS:
            with contextlib.suppress(KeyError):  # a gap never seen
                self.question_start_gap_seconds.remove(label, between)
