"""Standing questions, worker side: find sealed clusters, score them against the watches, answer the matches.

Runs on the worker's engine thread (``IngestCalls.after_ingest``), except ``set_watches`` and ``take`` which
the router calls through Ray.

- **Seal detection.** After each ingest pass, a stream's *watermark* is the time of its newest evaluated
  frame: every frame holding KV up to it has been evaluated, none after it. The cluster holding the newest stored
  frame may still grow; every other cluster with frames after the watermark is sealed and whole, and is evaluated
  (``mosaic_core.engine.watching.WatchFrontier``, which finds them without listing the history). A merge or a
  recurring-scene join can absorb a cluster before it was evaluated into one whose other frames were: that
  cluster is scored whole, but its event covers only the frames after the watermark, so each frame is evaluated
  once and a merge never re-fires a watch for frames it already saw. The watermark is saved with the stream's
  durable state (each telemetry poll and at shutdown), so a graceful restart neither re-evaluates old history
  nor skips what sealed while it was down; after a crash, clusters evaluated since the last save are scored
  again. A worker starts with no watches and gets the router's list a second or more later: until that first
  list, no watermark moves, so the clusters sealed meanwhile are scored against it (after
  ``WATCH_LIST_WAIT_S`` without one, evaluation goes on with none, and the log says so once).
- **Scoring.** All new sealed clusters of a stream against all its watches in one batched pass
  (``mosaic_core.engine.watching.WatchScorer``).
- **Filters.** Above its threshold, a watch fires unless the cluster starts outside its active hours (its
  start on the stream clock plus the stream's clock epoch: 0 for pushed cameras, whose clock is Unix time, the
  wall-clock time at which a pulled source's clock read 0), or within ``cooldown_s`` (stream clock) of the end
  of that watch's previous event on the stream.
- **Answer.** A short low-priority answer over the cluster's span widened by ``context_s`` on each side
  (``QuestionRunner.submit_background``). If it cannot run (queue full, deadline) the event still fires with
  ``answer_error`` saying why.
- **Outbox.** Fired events wait in a bounded outbox until the router takes them; overflow drops the oldest,
  counted.
- **Deleted streams.** ``forget_stream`` drops the stream's watermark and cooldowns, and ends its incarnation.
  Its events still in the outbox, and those posted later (an answer that finishes after the delete), still go to
  the router, since they fired before the delete, but marked ``sets_cooldown=False``: the router stores them
  without their cooldown, which a stream created again under the id would otherwise inherit.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter, deque

from mosaic_core.engine.results import Answer
from mosaic_core.engine.watching import SealedSpan, WatchFrontier, WatchScorer
from services.engine_loop import EngineLoop
from services.question_job import QuestionJob
from services.watches_spec import FiredEvent, WatchReport, WatchSpec

log = logging.getLogger(__name__)
# Score timings kept between two router polls (about a second apart); beyond it the oldest samples are left out
# of the latency histogram. Only the histogram thins out: the count of evaluations stays exact.
MAX_SCORE_SAMPLES = 1000
WATCH_LIST_WAIT_S = 300.0  # how long a new worker holds its watermarks for the router's first watch list


def _log_failure(future) -> None:
    if future.exception() is not None:
        log.error("dropping a removed watch's cached queries failed", exc_info=future.exception())


class WorkerWatches:
    """One worker's watch evaluation.

    Args:
        engine: the worker's engine.
        loop: its engine loop (for background answers).
        retention_s: returns a stream's retention (0 keeps everything).
        clock_epoch_unix: returns the Unix time at which a stream's clock read 0 (0.0 for a Unix clock).
        max_outbox: fired events kept until the router takes them.
        answer_timeout_s: how long an event may wait for its answer before it fires without one.
        context_s: seconds of neighbouring history the answer may also read, on each side of the cluster.
        query_cache_bytes: bound on the scorer's cached question queries.
    """

    def __init__(
        self,
        engine,
        loop: EngineLoop,
        *,
        retention_s,
        clock_epoch_unix=lambda stream_id: 0.0,
        max_outbox: int = 1000,
        answer_timeout_s: float = 30.0,
        context_s: float = 0.0,
        query_cache_bytes: int = 1 << 30,
    ) -> None:
        if max_outbox < 1 or not answer_timeout_s > 0 or not context_s >= 0:
            raise ValueError(
                f"max_outbox={max_outbox} must be >= 1, answer_timeout_s={answer_timeout_s} > 0 and "
                f"context_s={context_s} >= 0"
            )
        self.engine = engine
        self.loop = loop
        self.retention_s = retention_s
        self.clock_epoch_unix = clock_epoch_unix
        self.scorer = WatchScorer(engine, max_cache_bytes=query_cache_bytes)
        self.answer_timeout_s = answer_timeout_s
        self.context_s = context_s
        self._specs: dict[str, WatchSpec] = {}
        self._frontiers: dict[str, WatchFrontier] = {}  # stream -> its watermark and the clusters it waits on
        self._fired_until: dict[tuple[str, str], float] = {}  # (watch, stream) -> end_s of its last event
        # stream -> a token of its incarnation: events carry it to the outbox, which takes a stale one's event
        # without its cooldown
        self._incarnations: dict[str, object] = {}
        self._restored: set[str] = set()  # streams restored after a restart, not deleted since (``set_watches``)
        self._outbox: deque[FiredEvent] = deque()
        self._max_outbox = max_outbox
        self._cond = threading.Condition()
        self._num_evaluations = 0
        self._suppressed: Counter[str] = Counter()
        self._dropped: Counter[str] = Counter()
        self._score_seconds: deque[float] = deque(maxlen=MAX_SCORE_SAMPLES)
        self._started_s = time.monotonic()
        self._have_watch_list = False  # set by the router's first ``set_watches``
        self._said_no_list = False

    # -- router calls (any thread) -------------------------------------------------------------------
    def set_watches(self, specs: list[WatchSpec]) -> None:
        """Replaces the watches. For a stream this worker restored, cooldown state the router kept wins when it is
        newer than ours (this process has not seen the stream's events before its restart). A stream this worker
        created has seen every one of its events here, so the router's cooldowns of its id are a deleted
        predecessor's, read before the delete: the stream's clock may start again at 0, and must not find them.
        Only the streams this worker holds keep a cooldown."""
        held = set(self.engine.streams)
        with self._cond:
            self._have_watch_list = True
            old_questions = {s.question for s in self._specs.values()}
            old_specs, self._specs = self._specs, {s.watch_id: s for s in specs}
            # Deleted and created again under its id since the last list (through another router, or the list
            # without it never came): the new watch starts without the old one's cooldowns.
            replaced = {w for w, s in self._specs.items() if w in old_specs and old_specs[w].created_s != s.created_s}
            for key in [k for k in self._fired_until if k[0] in replaced]:
                del self._fired_until[key]
            for spec in specs:
                for stream_id, until in spec.fired_until_s.items():
                    key = (spec.watch_id, stream_id)
                    if stream_id in self._restored:
                        self._fired_until[key] = max(until, self._fired_until.get(key, float("-inf")))
            gone = old_questions - {s.question for s in specs}
            live = set(self._specs)
            for key in [k for k in self._fired_until if k[0] not in live or k[1] not in held]:
                del self._fired_until[key]
        # Not waited for: the router gives each worker a few seconds to take the list, and the engine thread
        # may be in a long ingest pass. Until it runs, a dropped question's cached queries are only unused.
        for question in gone:
            self.loop.post(self.scorer.forget, question=question).add_done_callback(_log_failure)

    def take(self, wait_s: float) -> WatchReport:
        """Fired events and counts since the last call; waits up to ``wait_s`` for an event."""
        with self._cond:
            if not self._outbox:
                self._cond.wait(wait_s)
            report = WatchReport(
                events=list(self._outbox),
                num_evaluations=self._num_evaluations,
                suppressed=dict(self._suppressed),
                dropped=dict(self._dropped),
                score_seconds=list(self._score_seconds),
                num_watches=len(self._specs),
            )
            self._outbox.clear()
            self._num_evaluations = 0
            self._suppressed.clear()
            self._dropped.clear()
            self._score_seconds.clear()
        return report

    # -- watermarks (engine thread) ------------------------------------------------------------------
    def restore_watermark(self, stream_id: str, watermark_s: float | None) -> None:
        """After a restart: the saved watermark, else the end of the restored cluster that ends second latest (the
        one that ends latest held the newest frame and may have been growing: it is evaluated once a frame of the
        stream's next cluster is stored)."""
        if watermark_s is None:
            ends = sorted(c.end_s for c in self.engine.clusters(stream_id))
            watermark_s = ends[-2] if len(ends) > 1 else float("-inf")
        self._frontiers[stream_id] = WatchFrontier(watermark_s=watermark_s)
        with self._cond:
            self._restored.add(stream_id)

    def watermark_of(self, stream_id: str) -> float | None:
        frontier = self._frontiers.get(stream_id)
        return None if frontier is None or frontier.watermark_s == float("-inf") else frontier.watermark_s

    def forget_stream(self, stream_id: str) -> None:
        """The stream was deleted: its watermark and cooldowns go, and its unreported events lose theirs (module
        doc)."""
        self._frontiers.pop(stream_id, None)
        self.scorer.forget(stream_id=stream_id)
        with self._cond:
            self._incarnations.pop(stream_id, None)
            self._restored.discard(stream_id)
            for key in [k for k in self._fired_until if k[1] == stream_id]:
                del self._fired_until[key]
            for event in self._outbox:
                if event.stream_id == stream_id:
                    event.sets_cooldown = False

    # -- evaluation (engine thread) ------------------------------------------------------------------
    def on_ingested(self, stream_ids) -> None:
        for stream_id in stream_ids:
            if stream_id in self.engine.streams:
                self._evaluate(stream_id)

    def _evaluate(self, stream_id: str) -> None:
        if not self._have_watch_list:  # a flag the router's thread only ever sets
            if time.monotonic() - self._started_s < WATCH_LIST_WAIT_S:
                return  # the clusters sealed meanwhile stay after the watermark, for the first list's watches
            if not self._said_no_list:
                self._said_no_list = True
                log.warning("no watch list from the router %.0f s after start: sealed clusters are evaluated "
                            "without one until it comes", WATCH_LIST_WAIT_S)  # fmt: skip
        frontier = self._frontiers.setdefault(stream_id, WatchFrontier())
        new = frontier.sealed(self.engine, stream_id)
        if not new:
            return
        frontier.advance(new)
        with self._cond:
            watches = [s for s in self._specs.values() if s.applies_to(stream_id)]
        if not watches:
            return
        with self._cond:
            incarnation = self._incarnations.setdefault(stream_id, object())
        sealed_unix_s = time.time()
        questions = list(dict.fromkeys(w.question for w in watches))
        started = time.perf_counter()
        try:
            scores = self.scorer.score(stream_id, [c.cluster_id for c in new], questions)
        except Exception:
            # The watermark has moved past these clusters, so they are not retried (a failure that repeats
            # would fail every pass); the lost evaluations are counted, and logged once per pass.
            log.exception("scoring %d sealed clusters of stream %r failed; their watches are not evaluated",
                          len(new), stream_id)  # fmt: skip
            with self._cond:
                self._dropped["score_failed"] += len(new) * len(watches)
            return
        elapsed = time.perf_counter() - started
        lifts = {(s.question, s.cluster_id): s.lift for s in scores}
        with self._cond:
            self._num_evaluations += len(new) * len(watches)
            self._score_seconds.extend([elapsed / len(new)] * len(new))
        for cluster in new:
            for watch in watches:
                lift = lifts[(watch.question, cluster.cluster_id)]
                if lift >= watch.threshold and self._passes(watch, stream_id, cluster):
                    self._answer(watch, cluster, lift, sealed_unix_s, incarnation)

    def _passes(self, watch: WatchSpec, stream_id: str, cluster: SealedSpan) -> bool:
        if watch.active_hours is not None and not watch.active_hours.contains(
            self.clock_epoch_unix(stream_id) + cluster.start_s
        ):
            self._suppress("outside_hours")
            return False
        key = (watch.watch_id, stream_id)
        with self._cond:
            until = self._fired_until.get(key)
            if until is not None and cluster.start_s < until + watch.cooldown_s:
                self._suppressed["cooldown"] += 1
                return False
            self._fired_until[key] = cluster.end_s
        return True

    def _suppress(self, reason: str) -> None:
        with self._cond:
            self._suppressed[reason] += 1

    def _answer(
        self, watch: WatchSpec, cluster: SealedSpan, lift: float, sealed_unix_s: float, incarnation: object
    ) -> None:
        event = FiredEvent(
            watch_id=watch.watch_id,
            stream_id=cluster.stream_id,
            cluster_id=cluster.cluster_id,
            start_s=cluster.start_s,
            end_s=cluster.end_s,
            score=lift,
            answer="",
            answer_error="",
            sealed_unix_s=sealed_unix_s,
            fired_unix_s=0.0,
            watch_created_s=watch.created_s,
        )
        job = QuestionJob(
            question_id=f"watch-{watch.watch_id}-{uuid.uuid4().hex[:8]}",
            stream_id=cluster.stream_id,
            question=watch.question,
            max_new_tokens=watch.max_answer_tokens,
            time_range=(cluster.start_s - self.context_s, cluster.end_s + self.context_s),
            deadline_s=time.monotonic() + self.answer_timeout_s,
            retention_s=self.retention_s(cluster.stream_id),
        )
        job.on_finish = lambda finished, error: self._answered(event, incarnation, finished, error)
        if not self.loop.questions.submit_background(job):
            with self._cond:
                self._dropped["answer_queue_full"] += 1
            event.answer_error = "the worker's queue of watch answers was full; the event fired without an answer"
            self._post(event, incarnation)

    def _answered(self, event: FiredEvent, incarnation: object, job: QuestionJob, error: BaseException | None) -> None:
        answer = None
        while not job.events.empty():
            item = job.events.get_nowait()
            if isinstance(item, Answer):
                answer = item
        if answer is not None:
            event.answer = answer.text
        else:
            event.answer_error = str(error) if error is not None else "no answer was produced"
        self._post(event, incarnation)

    def _post(self, event: FiredEvent, incarnation: object) -> None:
        """Queues the event for the router; if its stream was deleted since it fired, without its cooldown."""
        event.fired_unix_s = time.time()
        with self._cond:
            if self._incarnations.get(event.stream_id) is not incarnation:
                event.sets_cooldown = False
            if len(self._outbox) >= self._max_outbox:
                self._outbox.popleft()
                self._dropped["outbox_full"] += 1
            self._outbox.append(event)
            self._cond.notify_all()
