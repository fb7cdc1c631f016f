"""The engine loop's questions: which may start, a step of each, and how each ends (engine thread, except where
a method says otherwise).

**Questions do not hold their stream.** A question reads the slot tables it built at its prefill: the sink and
window pages it read are held and the clusters it retrieved pinned until it ends, so the stream's frames keep
going in while it answers and the answer is the one it would have been without them
(``tests/engine/test_ingest_during_answer.py``). At most ``max_questions_per_stream`` questions per stream are
running or waiting here; more are refused with ``QueueFullError`` (RESOURCE_EXHAUSTED).

**Background answers** (a watch's short answer about a sealed cluster, ``submit_background``) wait in their own
bounded queue and start only when no interactive question is running or waiting on this worker;
``max_background_running`` (1 by default) run at once, each on its own stream. Once started it is an ordinary,
short question.

**Device room.** Each running question holds device pages for its retrieved clusters and its own tokens. A
question that finds no room while other questions hold theirs waits (in its queue, first in line) until one of
them ends, instead of failing; it fails with ``CapacityError`` (RESOURCE_EXHAUSTED) only when nothing else holds
room, or once it has sent tokens.

**Deadlines and cancellation** are checked before each step and while a question waits: an expired or
cancelled question is closed (its retrieval pins released) and ends with ``DeadlineError`` or
``CancelledError``. A deadline miss is logged as one line, without a traceback.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque

from mosaic_core.engine.results import Answer
from mosaic_core.errors import CapacityError, OutOfRangeError
from services.errors import (
    DeadlineError,
    NoFramesYetError,
    QuestionCancelled,
    QueueFullError,
    StreamDeletedError,
    UnavailableError,
)
from services.question_job import DONE, QuestionJob
from services.telemetry import WorkerTelemetry
from services.tier_sync import TierSync

log = logging.getLogger(__name__)
DEFAULT_MAX_QUESTIONS_PER_STREAM = 4
RETRY_AFTER_S = 0.5  # the hint a refused question gets
DEFAULT_MAX_BACKGROUND_JOBS = 64
MAX_SERVE_ROUNDS = 4  # rounds of questions one pause starts, each round those that arrived during the one before


class QuestionRunner:
    """The questions running or waiting on one worker's engine thread.

    Args:
        engine: the worker's engine.
        tier_sync: mirrors clusters into the metadata store after each answer.
        telemetry: records the gaps between two chances to start a question.
        wake: set when a question arrives or is cancelled, to wake the engine thread.
        max_questions_per_stream: questions of one stream running or waiting here; more are refused.
        max_background_jobs: background answers that may wait; ``submit_background`` refuses more.
        max_background_running: background answers that may run at once (each on its own stream).
    """

    def __init__(
        self,
        engine,
        tier_sync: TierSync,
        telemetry: WorkerTelemetry,
        wake: threading.Event,
        *,
        max_questions_per_stream: int = DEFAULT_MAX_QUESTIONS_PER_STREAM,
        max_background_jobs: int = DEFAULT_MAX_BACKGROUND_JOBS,
        max_background_running: int = 1,
    ) -> None:
        self.engine = engine
        self.tier_sync = tier_sync
        self.telemetry = telemetry
        self.wake = wake
        self.max_questions_per_stream = max_questions_per_stream
        self.max_background_jobs = max_background_jobs
        self.max_background_running = max_background_running
        self.served_in_pauses_s = 0.0  # engine-thread time spent on questions inside ingest calls and at their ends
        self._last_chance: tuple[str, float] | None = None  # the engine thread's last chance to start a question
        self._background: deque[QuestionJob] = deque()
        self._questions: list[QuestionJob] = []
        self._pending_questions: deque[QuestionJob] = deque()
        self._by_id: dict[str, QuestionJob] = {}
        self._jobs_lock = threading.Lock()
        self._num_jobs: dict[str, int] = defaultdict(int)  # stream -> questions running or waiting here
        self._questions_finished = 0  # running questions that ended, each giving its device room back
        self._closed = False  # the engine thread has ended its questions and takes no more (under ``_jobs_lock``)

    # -- other threads ------------------------------------------------------------------------------
    def questions_of(self, stream_id: str) -> int:
        """The stream's questions running or waiting here (``submit`` refuses one past ``max_questions_per_stream``)."""
        with self._jobs_lock:
            return self._num_jobs.get(stream_id, 0)

    def submit(self, job: QuestionJob) -> QuestionJob:
        """Queues a question for the engine thread.

        Raises:
            QueueFullError: the stream already has ``max_questions_per_stream`` questions here.
            UnavailableError: the engine thread has stopped (the worker is shutting down): nothing would answer it.
        """
        with self._jobs_lock:
            if self._closed:
                raise UnavailableError("the worker is shutting down; ask again once it is back")
            num_jobs = self._num_jobs[job.stream_id]
            if num_jobs >= self.max_questions_per_stream:
                raise QueueFullError(
                    f"stream {job.stream_id!r} already has {num_jobs} questions running or waiting, its limit; "
                    f"retry in about {RETRY_AFTER_S * 1000:.0f} ms",
                    retry_after_s=RETRY_AFTER_S,
                )
            self._num_jobs[job.stream_id] = num_jobs + 1
            job.submitted_s = time.monotonic()
            self._by_id[job.question_id] = job
            self._pending_questions.append(job)  # under the lock: the engine thread's last sweep sees it
        self.wake.set()
        return job

    def submit_background(self, job: QuestionJob) -> bool:
        """Queues a low-priority answer (engine thread only); False when ``max_background_jobs`` already wait."""
        if len(self._background) >= self.max_background_jobs:
            return False
        job.low_priority = True
        job.submitted_s = time.monotonic()
        self._background.append(job)
        return True

    def cancel(self, question_id: str) -> bool:
        job = self._by_id.get(question_id)
        if job is None:
            return False
        job.cancelled.set()
        self.wake.set()
        return True

    def seconds_since_chance(self) -> float:
        """How long the engine thread has gone without a chance to start a question (0 before its first)."""
        last = self._last_chance
        return 0.0 if last is None else time.monotonic() - last[1]

    def last_chance_kind(self) -> str:
        """The kind of the engine thread's last chance to start a question ("none" before its first)."""
        last = self._last_chance
        return "none" if last is None else last[0]

    # -- engine thread ------------------------------------------------------------------------------
    def has_running(self) -> bool:
        return bool(self._questions)

    def question_waits(self) -> bool:
        return bool(self._pending_questions)

    def serve_at_pause(self, chance: str = "pause") -> None:
        """At a pause inside an ingest call, at its start (``chance`` "call_start") or at its end before its upkeep
        ("call_end"): starts the questions that arrived and runs each one's prefill and first token
        (``services.engine_loop``). Questions that arrive meanwhile start at the same pause, after them (up to
        ``MAX_SERVE_ROUNDS`` rounds), not at the next one, a chunk of ingest work later. Background answers,
        commands, later tokens and questions about a stream with no frames yet wait for the loop."""
        for _ in range(MAX_SERVE_ROUNDS):
            self._chance(chance)
            if not self._pending_questions or not self._serve_pending():
                return

    def _serve_pending(self) -> bool:
        """Starts the waiting questions that have device room and runs each one's prefill; says whether any
        started."""
        started_s = time.monotonic()
        try:
            started = self._start_interactive(started_s)
            for job in [j for j in self._questions if j.gen is None and not j.low_priority]:
                if self._has_frames(job.stream_id):  # else its first frames may be in this very call: ask after it
                    self._step(job)
            return started
        finally:
            self.served_in_pauses_s += time.monotonic() - started_s

    def _has_frames(self, stream_id: str) -> bool:
        return stream_id in self.engine.streams and self.engine.stream(stream_id).frames_ingested > 0

    def _chance(self, kind: str) -> None:
        """The engine thread may start a question now (``QUESTION_START_CHANCES``): the gap since the last such
        chance goes to telemetry, named by the two."""
        now = time.monotonic()
        if self._last_chance is not None:
            last_kind, last_s = self._last_chance
            self.telemetry.question_start_gap(f"{last_kind}_to_{kind}", now - last_s)
        self._last_chance = (kind, now)

    def restart_chances(self, kind: str) -> None:
        """Counts the next gap between chances to start a question from now, as a chance of ``kind`` without a gap
        before it (after an idle wait, which a question wakes)."""
        self._last_chance = (kind, time.monotonic())

    def start_questions(self) -> bool:
        """Moves waiting questions to the running set, except those waiting for device room; then background
        answers, if nothing interactive waits."""
        self._chance("loop")
        now = time.monotonic()
        started = self._start_interactive(now)
        return self._start_background(now) or started

    def _start_interactive(self, now: float) -> bool:
        started = False
        for job in list(self._pending_questions):
            if job.cancelled.is_set() or now > job.deadline_s:
                self._pending_questions.remove(job)
                self._step(job)  # ends it with its cancellation or deadline
                continue
            if self._waits_for_room(job):
                continue
            self._pending_questions.remove(job)
            self._questions.append(job)
            started = True
        return started

    def _start_background(self, now: float) -> bool:
        """Starts background answers, oldest first, while nothing interactive runs or waits (module doc): at most
        ``max_background_running`` at once, one per stream."""
        if not self._background or self._pending_questions or any(not j.low_priority for j in self._questions):
            return False
        running = sum(1 for j in self._questions if j.low_priority)
        busy = {j.stream_id for j in self._questions}
        worked = False
        for job in list(self._background):
            if job.stream_id not in self.engine.streams:
                self._background.remove(job)
                self._finish(job, StreamDeletedError(f"stream {job.stream_id!r} was deleted"))
            elif job.cancelled.is_set() or now > job.deadline_s:
                self._background.remove(job)
                self._step(job)  # ends it with its cancellation or deadline
            elif running < self.max_background_running and job.stream_id not in busy:
                if self._waits_for_room(job):
                    continue
                self._background.remove(job)
                self._questions.append(job)
                running += 1
                busy.add(job.stream_id)
            else:
                continue
            worked = True
        return worked

    def step_running(self) -> None:
        """A step (prefill or one token) of every running question."""
        for job in list(self._questions):
            self._step(job)

    def _step(self, job: QuestionJob) -> None:
        if job.cancelled.is_set():
            return self._finish(job, QuestionCancelled(f"question {job.question_id} was cancelled"))
        late_s = time.monotonic() - job.deadline_s
        if late_s > 0:
            what = "waiting" if job.gen is None else "answering"
            log.warning("question %s on stream %s missed its deadline while %s", job.question_id, job.stream_id, what)
            return self._finish(job, DeadlineError(f"the deadline passed while {what} about stream {job.stream_id!r}"))
        try:
            if job.gen is None:
                if self.engine.stream(job.stream_id).frames_ingested == 0:
                    raise NoFramesYetError(
                        f"stream {job.stream_id!r} has ingested no frames yet, so there is nothing to answer from; "
                        "ask again once its first frames are in (GetStream shows frames_ingested)"
                    )
                job.started_s = time.monotonic()
                job.gen = self.engine.ask(
                    job.stream_id,
                    job.question,
                    max_new_tokens=job.max_new_tokens,
                    time_range=self._retained_range(job),
                    profile=True,  # fills AnswerTimings.retrieval_s, from CUDA events: no wait for the device
                )
            event = next(job.gen)
        except StopIteration:
            return self._finish(job, None)
        except CapacityError as err:
            if job.answering or not any(j is not job and j.gen is not None for j in self._questions):
                return self._finish(job, err)
            return self._park_for_room(job, err)
        except Exception as err:
            return self._finish(job, err)
        job.answering = True
        if isinstance(event, Answer):
            event.last_hidden = None  # a tensor: not for the wire
            event.timings.start_wait_s = job.started_s - job.submitted_s
            job.events.put(event)
            self.tier_sync.flush([job.stream_id])  # retrieval moves and merges
            return self._finish(job, None)
        if not job.first_event_s:
            job.first_event_s = time.monotonic()
        job.events.put(event)
        return None

    def _park_for_room(self, job: QuestionJob, err: CapacityError) -> None:
        """Sends a question that found no device room back to wait until a running question gives its room back.

        Only a question that has sent nothing yet starts over; its generator has already released what it took.
        """
        log.info("question %s waits for device room held by running questions: %s", job.question_id, err)
        job.gen = None
        job.waits_for_room_until = self._questions_finished
        self._questions.remove(job)
        (self._background if job.low_priority else self._pending_questions).appendleft(job)

    def _waits_for_room(self, job: QuestionJob) -> bool:
        return job.waits_for_room_until >= self._questions_finished

    def _retained_range(self, job: QuestionJob) -> tuple[float, float] | None:
        """Clips the question's time range to what retention keeps, counted back from the stream's newest frame (after
        a restart, the newest its history recorded); OUT_OF_RANGE if nothing is left."""
        newest = self.engine.stream(job.stream_id).last_timestamp_s
        if job.retention_s <= 0 or newest is None:
            return job.time_range
        cutoff_s = newest - job.retention_s
        start_s, end_s = job.time_range if job.time_range is not None else (cutoff_s, newest)
        if end_s < cutoff_s:
            raise OutOfRangeError(
                f"time range {start_s:.3f}s to {end_s:.3f}s is outside stream {job.stream_id!r}'s retention "
                f"(the last {job.retention_s:g}s: {cutoff_s:.3f}s to {newest:.3f}s)"
            )
        return (max(start_s, cutoff_s), end_s)

    def _finish(self, job: QuestionJob, error: BaseException | None) -> None:
        if job.gen is not None and error is not None:
            job.gen.close()  # runs the engine's finally: releases the retrieval pins
        if job in self._questions:
            self._questions.remove(job)
            self._questions_finished += 1
        with self._jobs_lock:
            if job.question_id in self._by_id:
                self._num_jobs[job.stream_id] -= 1
                if self._num_jobs[job.stream_id] <= 0:
                    del self._num_jobs[job.stream_id]
        if error is not None:
            job.events.put(error)
        job.events.put(DONE)
        self._by_id.pop(job.question_id, None)
        if job.on_finish is not None:
            try:
                job.on_finish(job, error)
            except Exception:
                log.exception("question %s: finish callback failed", job.question_id)

    def cancel_stream_questions(self, stream_id: str) -> None:
        """Ends the stream's questions now (engine thread only): used before the stream closes."""
        everything = self._questions + list(self._pending_questions) + list(self._background)
        for job in [j for j in everything if j.stream_id == stream_id]:
            if job in self._pending_questions:
                self._pending_questions.remove(job)
            if job in self._background:
                self._background.remove(job)
            self._finish(job, StreamDeletedError(f"stream {stream_id!r} was deleted before its answer was done"))

    def close(self) -> None:
        """Ends every question as the engine thread stops, and takes no more (``submit`` refuses them)."""
        with self._jobs_lock:  # no question is submitted after this sweep (``submit``)
            self._closed = True
            left = self._questions + list(self._pending_questions) + list(self._background)
        for job in left:
            self._finish(job, UnavailableError("the worker is shutting down; ask again once it is back"))
