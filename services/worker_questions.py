"""A worker's side of its questions: an ask handed to the engine loop and its events streamed back, and cancels,
kept for a while when they come before their ask."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections import OrderedDict

from mosaic_core.engine.results import Answer
from mosaic_core.errors import UnknownStreamError
from services.errors import DeadlineError
from services.question_job import DONE, QuestionJob
from services.question_runner import QuestionRunner
from services.session import StreamSession
from services.telemetry import WorkerTelemetry

# An answer the engine loop has not ended this long past its question's deadline is given up by the answer thread
# waiting on it (the loop ends late answers itself, so only a stuck engine thread leaves one), and the thread goes back.
ABANDON_AFTER_DEADLINE_S = 30.0
# A cancel that comes before its ask (the ask waited for a thread) is kept this long, for the ask to find; at most
# EARLY_CANCELS_KEPT of them, the oldest going first.
EARLY_CANCEL_KEEP_S = 600.0
EARLY_CANCELS_KEPT = 4096


class WorkerQuestions:
    """The questions asked of one worker.

    Args:
        engine: the worker's engine (read for a stream's frames ingested).
        questions: the engine loop's question runner, which answers them.
        telemetry: records how long each ask waited for an answer thread.
        sessions: the worker's open streams by id (read only here).
    """

    def __init__(
        self, engine, questions: QuestionRunner, telemetry: WorkerTelemetry, sessions: dict[str, StreamSession]
    ) -> None:
        self.engine = engine
        self.questions = questions
        self.telemetry = telemetry
        self.sessions = sessions
        self._cancel_lock = threading.Lock()  # a cancel and the submit of its ask, one at a time
        self._early_cancels: OrderedDict[str, float] = OrderedDict()  # question id -> when its cancel came

    def ask(
        self,
        question_id: str,
        stream_id: str,
        question: str,
        max_new_tokens: int,
        time_range,
        timeout_s: float,
        sent_unix: float | None = None,
    ):
        """Streams ``TokenEvent``s then the ``Answer``.

        ``timeout_s`` counts from ``sent_unix``, the caller's wall clock when it sent the ask, so the time the ask
        waited for one of the worker's answer threads counts against it (the router and its workers keep their clocks
        in step, as Kubernetes nodes do; a clock behind the caller's counts no wait).
        """
        arrived_s = time.monotonic()
        waited_s = 0.0 if sent_unix is None else min(timeout_s, max(0.0, time.time() - sent_unix))
        if sent_unix is not None:
            self.telemetry.answer_thread_wait(waited_s)
        session = self.sessions.get(stream_id)
        if session is None:
            raise UnknownStreamError(f"unknown stream {stream_id!r}")
        state = self.engine.streams.get(stream_id)
        session.check_answerable(0 if state is None else state.frames_ingested)
        job = QuestionJob(
            question_id=question_id or uuid.uuid4().hex,
            stream_id=stream_id,
            question=question,
            max_new_tokens=max_new_tokens,
            time_range=None if time_range is None else (float(time_range[0]), float(time_range[1])),
            deadline_s=arrived_s + timeout_s - waited_s,
            retention_s=session.record.retention_s,
        )
        with self._cancel_lock:
            self.questions.submit(job)
            if self._early_cancels.pop(job.question_id, None) is not None:
                self.questions.cancel(job.question_id)
        first_out_s = None
        try:
            while (item := self._next_event(job)) is not DONE:
                if isinstance(item, BaseException):
                    raise item
                if first_out_s is None:
                    first_out_s = time.monotonic()
                if isinstance(item, Answer):
                    item.timings.worker_first_token_s = first_out_s - arrived_s
                    item.timings.token_handoff_s = max(0.0, first_out_s - (job.first_event_s or first_out_s))
                yield item
        finally:
            job.cancelled.set()

    @staticmethod
    def _next_event(job: QuestionJob):
        """The answer's next event, or DeadlineError once ``ABANDON_AFTER_DEADLINE_S`` past its deadline."""
        try:
            return job.events.get(timeout=max(0.0, job.deadline_s + ABANDON_AFTER_DEADLINE_S - time.monotonic()))
        except queue.Empty:
            raise DeadlineError(
                f"question {job.question_id}: the worker's engine thread did not end its answer within "
                f"{ABANDON_AFTER_DEADLINE_S:g} s of its deadline; it is given up"
            ) from None

    def cancel(self, question_id: str) -> bool:
        """Stops a question's answer; True when it was here. A cancel that comes before its ask (which waits for an
        answer thread, and may come after the cancel) is kept for ``EARLY_CANCEL_KEEP_S``: the ask, when it comes,
        is stopped at once."""
        with self._cancel_lock:
            if self.questions.cancel(question_id):
                return True
            now = time.monotonic()
            kept = self._early_cancels
            while kept and (len(kept) >= EARLY_CANCELS_KEPT or now - next(iter(kept.values())) > EARLY_CANCEL_KEEP_S):
                kept.popitem(last=False)
            self._early_cancels[question_id] = now
            return False
