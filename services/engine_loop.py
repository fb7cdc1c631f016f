"""The one thread that drives a worker's engine: cross-stream ingest calls interleaved with answer tokens.

The engine is not thread-safe, so every engine call runs here. One iteration:

    commands (open/close stream, stats)  ->  one ingest call: up to ``max_batch_frames`` streams with waiting
    frames, those longest behind first, each giving the frames one engine row carries (the engine's
    ``max_frames_per_pass``, 1 by default)  ->  start the questions that may start  ->  steps (prefill or one
    token) of every running question, for the answer slice below  ->  sleep until woken if nothing happened

**A new question does not wait for the ingest call under way.** An ingest call pauses after the vision tower (or
each chunk of ``ingest_pause_frames`` frames through it), inside it before every ``ingest_pause_blocks``-th block,
before every ``ingest_pause_layers``-th layer of each forward pass, and after every ``ingest_pause_placed`` frames
placed into clusters (``mosaic_core.engine.ingest_pauses``; with ``questions_alongside_ingest``, on CUDA, the host
does not wait at a pause, and the questions run on a high-priority stream beside the ingest work queued), and once
more at each end: at its start, once its frames are taken and before they are prepared for the vision tower, and at
its end, before the upkeep that follows it (metadata flush, retention, watches); at a pause the loop starts
the questions that arrived and runs each one's prefill, then those that arrived meanwhile, so a first token waits
for one chunk of ingest work, not for the rest of the call. Telemetry records every gap between two chances to start
a question (``mosaic_question_start_gap_seconds``), named by the chances at its ends. Nothing else runs at a pause:
commands, later tokens and the end of an answer wait for the call to end, so an answer's second token comes after
the call (bench/NOTES.md, session 12: decode through gRPC 31.8 ms a token at 64 cameras with pauses, 7.2 without, in
two calls).

**Ingest is never starved by questions.** Ingest goes first in every iteration.
Between two ingest calls the running questions advance a token each, and keep advancing while no frame waits,
for up to ``answer_slice_s`` once one does. Commands from other threads and new questions that arrive meanwhile
are served inside the slice, so neither waits for the next ingest call while answers run. So answers decode at the
engine's pace when cameras are quiet, and a frame waits at most about ``answer_slice_s`` plus one call (with 0,
answers advance a token per call while frames wait).

Each ingest call, with the frames it takes and the next call's tower queued ahead, is ``services.ingest_calls``;
the questions, how they start, wait and end, ``services.question_runner``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future

from services.config import ServiceConfig
from services.ingest_calls import (
    DEFAULT_INGEST_PAUSE_BLOCKS,
    DEFAULT_INGEST_PAUSE_FRAMES,
    DEFAULT_INGEST_PAUSE_LAYERS,
    DEFAULT_INGEST_PAUSE_PLACED,
    DEFAULT_QUESTIONS_ALONGSIDE_INGEST,
    IngestCalls,
)
from services.ingest_queue import IngestQueues
from services.question_runner import DEFAULT_MAX_BACKGROUND_JOBS, DEFAULT_MAX_QUESTIONS_PER_STREAM, QuestionRunner
from services.telemetry import WorkerTelemetry
from services.tier_sync import TierSync

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05
STATS_REFRESH_S = 0.5
DEFAULT_ANSWER_SLICE_S = 0.25


def _check_settings(
    max_questions_per_stream: int,
    ingest_pause_lookahead: int,
    answer_slice_s: float,
    pause_settings: tuple[int, int, int, int],
) -> None:
    """Raises ValueError unless the loop's settings are in range; ``pause_settings`` holds ingest_pause_layers,
    ingest_pause_frames, ingest_pause_blocks and ingest_pause_placed, in this order."""
    if min(max_questions_per_stream, ingest_pause_lookahead) < 1 or min(answer_slice_s, *pause_settings) < 0:
        ingest_pause_layers, ingest_pause_frames, ingest_pause_blocks, ingest_pause_placed = pause_settings
        raise ValueError(
            f"max_questions_per_stream={max_questions_per_stream} and ingest_pause_lookahead="
            f"{ingest_pause_lookahead} must be >= 1, answer_slice_s={answer_slice_s}, ingest_pause_layers="
            f"{ingest_pause_layers}, ingest_pause_frames={ingest_pause_frames}, ingest_pause_blocks="
            f"{ingest_pause_blocks} and ingest_pause_placed={ingest_pause_placed} >= 0"
        )


class EngineLoop:
    """Owns the engine thread.

    Its ``questions`` (``QuestionRunner``) take questions from other threads, and its ``ingest_calls``
    (``IngestCalls``) run the ingest calls; both run their engine work on this thread.

    Args:
        engine: the worker's engine.
        queues: per-stream ingest queues; their ``wake`` event also wakes this loop.
        tier_sync: mirrors clusters into the metadata store after each step.
        telemetry: counts ingested frames and batch sizes, and the engine thread's time by part.
        max_batch_frames: frames per ingest call.
        retention_s: returns a stream's retention (0 keeps everything), read at each retention pass.
        max_questions_per_stream: questions of one stream running or waiting here; more are refused.
        after_ingest: called on the engine thread with the ids of the streams of each ingest call.
        max_background_jobs: background answers that may wait; ``submit_background`` refuses more.
        max_background_running: background answers that may run at once (each on its own stream).
        answer_slice_s: how long running questions may keep decoding between ingest calls while frames wait.
        ingest_pause_layers, ingest_pause_frames, ingest_pause_blocks, ingest_pause_placed, ingest_pause_lookahead,
            ingest_pause_skip_idle, questions_alongside_ingest, encode_ahead: where ingest calls pause for
            questions, and whether the next call's tower goes first (``IngestCalls``).
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
        max_questions_per_stream: int = DEFAULT_MAX_QUESTIONS_PER_STREAM,
        after_ingest=None,
        max_background_jobs: int = DEFAULT_MAX_BACKGROUND_JOBS,
        max_background_running: int = 1,
        answer_slice_s: float = DEFAULT_ANSWER_SLICE_S,
        ingest_pause_layers: int = DEFAULT_INGEST_PAUSE_LAYERS,
        ingest_pause_frames: int = DEFAULT_INGEST_PAUSE_FRAMES,
        ingest_pause_blocks: int = DEFAULT_INGEST_PAUSE_BLOCKS,
        ingest_pause_placed: int = DEFAULT_INGEST_PAUSE_PLACED,
        ingest_pause_lookahead: int = 1,
        ingest_pause_skip_idle: bool = False,
        questions_alongside_ingest: bool = DEFAULT_QUESTIONS_ALONGSIDE_INGEST,
        encode_ahead: bool = False,
    ) -> None:
        pause_settings = (ingest_pause_layers, ingest_pause_frames, ingest_pause_blocks, ingest_pause_placed)
        _check_settings(max_questions_per_stream, ingest_pause_lookahead, answer_slice_s, pause_settings)
        self.engine = engine
        self.queues = queues
        self.wake = queues.wake
        self.telemetry = telemetry
        self.answer_slice_s = answer_slice_s
        self.questions = QuestionRunner(
            engine,
            tier_sync,
            telemetry,
            self.wake,
            max_questions_per_stream=max_questions_per_stream,
            max_background_jobs=max_background_jobs,
            max_background_running=max_background_running,
        )
        self.ingest_calls = IngestCalls(
            engine,
            queues,
            tier_sync,
            telemetry,
            self.questions,
            max_batch_frames=max_batch_frames,
            retention_s=retention_s,
            after_ingest=after_ingest,
            ingest_pause_layers=ingest_pause_layers,
            ingest_pause_frames=ingest_pause_frames,
            ingest_pause_blocks=ingest_pause_blocks,
            ingest_pause_placed=ingest_pause_placed,
            ingest_pause_lookahead=ingest_pause_lookahead,
            ingest_pause_skip_idle=ingest_pause_skip_idle,
            questions_alongside_ingest=questions_alongside_ingest,
            encode_ahead=encode_ahead,
        )
        self.stats = None  # latest EngineStats, refreshed every STATS_REFRESH_S
        self._stats_at = 0.0
        self._commands: deque[tuple[tuple, Future]] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # -- other threads ------------------------------------------------------------------------------
    @property
    def thread(self) -> threading.Thread:
        """The engine thread (every engine call runs on it)."""
        return self._thread

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self.wake.set()
        self._thread.join(timeout_s)

    def post(self, fn, *args, **kwargs) -> Future:
        """Queues ``fn(*args, **kwargs)`` for the engine thread without waiting; the future holds its outcome."""
        future: Future = Future()
        self._commands.append(((fn, args, kwargs), future))
        self.wake.set()
        return future

    def call(self, fn, *args, timeout_s: float | None = 120.0, **kwargs):
        """Runs ``fn(*args, **kwargs)`` on the engine thread and returns its result (or raises its error).

        Past ``timeout_s`` it raises TimeoutError. A command the engine thread had not started by then is withdrawn
        and never runs, so a caller that undoes its own part (a CreateStream's session) leaves nothing behind; one it
        had started runs to its end."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        future: Future = Future()
        self._commands.append(((fn, args, kwargs), future))
        self.wake.set()
        try:
            return future.result(timeout_s)
        except TimeoutError:
            name = getattr(fn, "__name__", "a command")
            if future.cancel():
                raise TimeoutError(f"the engine thread did not take {name} within {timeout_s:g} s; withdrawn") from None
            raise TimeoutError(f"{name} did not finish within {timeout_s:g} s on the engine thread") from None

    # -- engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self.wake.clear()
            try:
                worked = self._timed("other", self._run_commands)
                worked |= not self.ingest_calls.ended and self.ingest_calls.ingest_once()
                worked |= self._timed("questions", self.questions.start_questions)
                worked |= self._step_questions()
                self._timed("other", self._refresh_stats)
            except Exception:
                log.exception("engine loop step failed")
                worked = False
            if not worked:
                self._timed("idle", self.wake.wait, IDLE_WAIT_S)
                self.questions.restart_chances("loop")  # a question wakes the idle wait: no gap there
        self.questions.close()

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

    def _timed(self, part: str, fn, *args):
        """``fn(*args)``, its time counted to ``part`` of the engine thread's time (telemetry)."""
        started_s = time.monotonic()
        try:
            return fn(*args)
        finally:
            self.telemetry.spent(part, time.monotonic() - started_s)

    def _step_questions(self) -> bool:
        """A token of every running question, then more while the answer slice allows (module doc); commands
        and new questions that arrive meanwhile are served in between."""
        if not self.questions.has_running():
            return False
        slice_ends_s = time.monotonic() + self.answer_slice_s
        while True:
            self._timed("questions", self.questions.step_running)
            if not self.questions.has_running() or self._stop.is_set():
                return True
            if time.monotonic() >= slice_ends_s and (self.queues.total_frames() > 0 or self.ingest_calls.has_ahead()):
                return True
            self._timed("other", self._run_commands)
            self._timed("questions", self.questions.start_questions)
            self._timed("other", self._refresh_stats)

    def _refresh_stats(self) -> None:
        now = time.monotonic()
        if now - self._stats_at >= STATS_REFRESH_S:
            self._stats_at = now
            self.stats = self.engine.stats()


def service_loop(
    engine,
    queues: IngestQueues,
    tier_sync: TierSync,
    telemetry: WorkerTelemetry,
    config: ServiceConfig,
    *,
    retention_s,
    after_ingest,
) -> EngineLoop:
    """A worker's engine loop, with the service's batch, question and pause settings."""
    return EngineLoop(
        engine,
        queues,
        tier_sync,
        telemetry,
        max_batch_frames=config.max_batch_frames,
        retention_s=retention_s,
        max_questions_per_stream=config.max_questions_per_stream,
        answer_slice_s=config.answer_slice_s,
        ingest_pause_layers=config.ingest_pause_layers,
        ingest_pause_frames=config.ingest_pause_frames,
        ingest_pause_blocks=config.ingest_pause_blocks,
        ingest_pause_placed=config.ingest_pause_placed,
        ingest_pause_lookahead=config.ingest_pause_lookahead,
        ingest_pause_skip_idle=config.ingest_pause_skip_idle,
        questions_alongside_ingest=config.questions_alongside_ingest,
        encode_ahead=config.encode_ahead and engine.parts.model.device.type == "cuda",
        after_ingest=after_ingest,
        max_background_jobs=config.watch_answer_queue_size,
        max_background_running=config.watch_answer_concurrency,
    )
