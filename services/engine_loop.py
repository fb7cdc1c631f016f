"""The one thread that drives a worker's engine: cross-stream ingest batches interleaved with answer tokens.

The engine is not thread-safe, so every engine call runs here. One iteration:

    commands (open/close stream, stats)  ->  one ingest batch (up to max_batch_frames, one frame per stream
    per round, all streams in shared forward passes)  ->  one step (prefill or one token) of every running
    question, round-robin  ->  metadata sync  ->  sleep until woken if nothing happened

**Priority keeps ingest real-time.** Ingest goes first in every iteration, and a question advances one token
per iteration, so a long answer never holds cameras back for more than one token's time. A stream that a
question is reading is left out of ingest batches until the answer ends (its frames wait in the bounded
queue), because a frame entering the window mid-answer would change the history the answer attends to.

**Deadlines and cancellation** are checked before each step: an expired or cancelled question is closed
(its retrieval pins released) and ends with ``DeadlineError`` or ``CancelledError``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from mosaic_core.engine.results import Answer, FrameInput
from mosaic_core.errors import CapacityError, MosaicError, OutOfRangeError
from services.errors import DeadlineError
from services.ingest_queue import IngestQueues, QueuedFrame
from services.telemetry import WorkerTelemetry
from services.tier_sync import TierSync

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05
STATS_REFRESH_S = 0.5
DONE = object()  # ends a question's event queue


class QuestionCancelled(MosaicError):
    """The router gave up on the question (client went away)."""

    grpc_code = "CANCELLED"


@dataclass(slots=True)
class QuestionJob:
    """One question about one stream, advanced a step at a time by the loop."""

    question_id: str
    stream_id: str
    question: str
    max_new_tokens: int
    time_range: tuple[float, float] | None
    deadline_s: float  # time.monotonic() by which the answer must be done
    retention_s: float = 0.0
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    gen: object = None


class EngineLoop:
    """Owns the engine thread.

    Args:
        engine: the worker's engine.
        queues: per-stream ingest queues; their ``wake`` event also wakes this loop.
        tier_sync: mirrors clusters into the metadata store after each step.
        telemetry: counts ingested frames and batch sizes.
        max_batch_frames: frames per ingest call.
        retention_s: returns a stream's retention (0 keeps everything), read at each retention pass.
    """

    def __init__(
        self,
        engine,
        queues: IngestQueues,
        tier_sync: TierSync,
        telemetry: WorkerTelemetry,
        *,
        max_batch_frames: int,
        retention_s,
    ) -> None:
        self.engine = engine
        self.queues = queues
        self.wake = queues.wake
        self.tier_sync = tier_sync
        self.telemetry = telemetry
        self.max_batch_frames = max_batch_frames
        self.retention_s = retention_s
        self.stats = None  # latest EngineStats, refreshed every STATS_REFRESH_S
        self.last_ingested_s: dict[str, float] = {}  # stream -> timestamp of the newest ingested frame
        self._stats_at = 0.0
        self._commands: deque[tuple[tuple, Future]] = deque()
        self._questions: list[QuestionJob] = []
        self._pending_questions: deque[QuestionJob] = deque()
        self._by_id: dict[str, QuestionJob] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # -- other threads ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self.wake.set()
        self._thread.join(timeout_s)

    def call(self, fn, *args, timeout_s: float | None = 120.0, **kwargs):
        """Runs ``fn(*args, **kwargs)`` on the engine thread and returns its result (or raises its error)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        future: Future = Future()
        self._commands.append(((fn, args, kwargs), future))
        self.wake.set()
        return future.result(timeout_s)

    def submit(self, job: QuestionJob) -> QuestionJob:
        self._by_id[job.question_id] = job
        self._pending_questions.append(job)
        self.wake.set()
        return job

    def cancel(self, question_id: str) -> bool:
        job = self._by_id.get(question_id)
        if job is None:
            return False
        job.cancelled.set()
        self.wake.set()
        return True

    @property
    def busy_streams(self) -> frozenset[str]:
        return frozenset(job.stream_id for job in self._questions)

    # -- engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self.wake.clear()
            try:
                worked = self._run_commands()
                worked |= self._ingest_once()
                worked |= self._step_questions()
                self._refresh_stats()
            except Exception:
                log.exception("engine loop step failed")
                worked = False
            if not worked:
                self.wake.wait(IDLE_WAIT_S)
        for job in self._questions + list(self._pending_questions):
            self._finish(job, QuestionCancelled("the worker is shutting down"))

    def _run_commands(self) -> bool:
        worked = False
        while self._commands:
            (fn, args, kwargs), future = self._commands.popleft()
            worked = True
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as err:
                future.set_exception(err)
        return worked

    def _ingest_once(self) -> bool:
        batch = self.queues.take_batch(self.max_batch_frames, exclude=self.busy_streams)
        if not batch:
            return False
        batch = [f for f in batch if f.stream_id in self.engine.streams]
        ingested = self._ingest(batch)
        done_s = time.monotonic()
        per_stream: dict[str, int] = defaultdict(int)
        for frame in ingested:
            per_stream[frame.stream_id] += 1
            self.last_ingested_s[frame.stream_id] = frame.timestamp_s
        if ingested:
            self.telemetry.ingested_batch(per_stream, [done_s - f.received_s for f in ingested])
        streams = {f.stream_id for f in batch}
        self.tier_sync.flush(streams)
        for stream_id in streams:
            self.tier_sync.apply_retention(stream_id, self.retention_s(stream_id))
        return True

    def _ingest(self, batch: list[QueuedFrame]) -> list[QueuedFrame]:
        """Ingests the batch; if the engine refuses it, retries stream by stream so one bad camera only
        loses its own frames (the engine checks a whole batch before changing anything)."""
        if not batch:
            return []
        try:
            self.engine.ingest([FrameInput(f.stream_id, f.timestamp_s, f.rgb) for f in batch])
            return batch
        except Exception as err:
            if len({f.stream_id for f in batch}) == 1:
                reason = "queue_full" if isinstance(err, CapacityError) else "invalid"
                log.warning("dropping %d frames of stream %s: %s", len(batch), batch[0].stream_id, err)
                self.telemetry.dropped(batch[0].stream_id, reason, len(batch))
                return []
        by_stream: dict[str, list[QueuedFrame]] = defaultdict(list)
        for frame in batch:
            by_stream[frame.stream_id].append(frame)
        return [f for frames in by_stream.values() for f in self._ingest(frames)]

    def _step_questions(self) -> bool:
        while self._pending_questions:
            self._questions.append(self._pending_questions.popleft())
        if not self._questions:
            return False
        for job in list(self._questions):
            self._step(job)
        return True

    def _step(self, job: QuestionJob) -> None:
        if job.cancelled.is_set():
            return self._finish(job, QuestionCancelled(f"question {job.question_id} was cancelled"))
        if time.monotonic() > job.deadline_s:
            return self._finish(
                job, DeadlineError(f"the deadline passed while answering about stream {job.stream_id!r}")
            )
        try:
            if job.gen is None:
                job.gen = self.engine.ask(
                    job.stream_id,
                    job.question,
                    max_new_tokens=job.max_new_tokens,
                    time_range=self._retained_range(job),
                )
            event = next(job.gen)
        except StopIteration:
            return self._finish(job, None)
        except Exception as err:
            return self._finish(job, err)
        if isinstance(event, Answer):
            event.last_hidden = None  # a tensor: not for the wire
            job.events.put(event)
            self.tier_sync.flush([job.stream_id])  # retrieval moves and merges
            return self._finish(job, None)
        job.events.put(event)
        return None

    def _retained_range(self, job: QuestionJob) -> tuple[float, float] | None:
        """Clips the question's time range to what retention keeps; OUT_OF_RANGE if nothing is left."""
        newest = self.last_ingested_s.get(job.stream_id)
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
        if error is not None:
            job.events.put(error)
        job.events.put(DONE)
        self._by_id.pop(job.question_id, None)

    def _refresh_stats(self) -> None:
        now = time.monotonic()
        if now - self._stats_at >= STATS_REFRESH_S:
            self._stats_at = now
            self.stats = self.engine.stats()

    def cancel_stream_questions(self, stream_id: str) -> None:
        """Ends the stream's questions now (engine thread only): used before the stream closes."""
        for job in [j for j in self._questions + list(self._pending_questions) if j.stream_id == stream_id]:
            if job in self._pending_questions:
                self._pending_questions.remove(job)
            self._finish(job, QuestionCancelled(f"stream {stream_id!r} was deleted"))
