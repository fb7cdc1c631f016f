"""The one thread that drives a worker's engine: cross-stream ingest calls interleaved with answer tokens.

The engine is not thread-safe, so every engine call runs here. One iteration:

    commands (open/close stream, stats)  ->  one ingest call: up to ``max_batch_frames`` streams with waiting
    frames, those longest behind first, each giving the frames one engine row carries (the engine's
    ``max_frames_per_pass``, 1 by default)  ->  start the questions that may start  ->  steps (prefill or one
    token) of every running question, for the answer slice below  ->  sleep until woken if nothing happened

**Every ingest call holds one row of frames per stream**, so it is one forward pass where the streams' frames are of
about one size (the engine gives rows of far fewer tokens a pass of their own). A call that held two frames of one
stream would take two passes, the second only as wide as the streams that had two, and narrow passes cost far more a
frame than wide ones (bench/NOTES.md, session 16). A stream left out of a full call is among the furthest behind at
the next, so every stream is reached within ``ceil(streams / max_batch_frames)`` calls.

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

**The next call's vision tower can go first** (``encode_ahead``): once an ingest call returns, the loop takes the next
call's frames and queues their uploads, keyframe thumbnails and vision tower (``Engine.encode_ahead``) before the
questions at the call's end (unless one waits already: it goes first) and its upkeep, pausing where a call's own
tower would, so a question that arrives meanwhile starts there; the next call uses them.
With the engine's ``tower_stream`` on CUDA, that tower runs on its own stream beside the language model the call just
queued, where a question's first token read back between the calls would otherwise leave the device nothing but the
question's work until the next call queued its tower. Without ``tower_stream`` on CUDA the setting is refused (with
a warning): the tower would be queued on the compute stream, ahead of every question between the calls. A stream's
lag (``oldest_wait_s``) counts the frames taken ahead, and answers stop decoding for them as for queued frames. They
count against their queues' bound until the call begins, so a full queue drops its oldest frame when it would have
without them taken.
Frames of a stream closed meanwhile are dropped (``drop_ahead``), and the call then queues its own tower.

**Ingest is never starved by questions.** Ingest goes first in every iteration.
Between two ingest calls the running questions advance a token each, and keep advancing while no frame waits,
for up to ``answer_slice_s`` once one does. Commands from other threads and new questions that arrive meanwhile
are served inside the slice, so neither waits for the next ingest call while answers run. So answers decode at the
engine's pace when cameras are quiet, and a frame waits at most about ``answer_slice_s`` plus one call (with 0,
answers advance a token per call while frames wait).

**Questions do not hold their stream.** A question reads the slot tables it built at its prefill: the sink and
window pages it read are held and the clusters it retrieved pinned until it ends, so the stream's frames keep
going in while it answers and the answer is the one it would have been without them
(``tests/engine/test_ingest_during_answer.py``). At most ``max_questions_per_stream`` questions per stream are
running or waiting here; more are refused with ``QueueFullError`` (RESOURCE_EXHAUSTED).

**Background answers** (a watch's short answer about a sealed cluster, ``submit_background``) wait in their own
bounded queue and start only when no interactive question is running or waiting on this worker;
``max_background_running`` (1 by default) run at once, each on its own stream. Once started it is an ordinary,
short question.
After each ingest call ``after_ingest(stream_ids)`` runs on this thread (watch evaluation).

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
import queue
import threading
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from mosaic_core.engine.ingest import EncodedFrames
from mosaic_core.engine.ingest_pauses import IngestPauses
from mosaic_core.engine.results import Answer, FrameInput, IngestResult
from mosaic_core.errors import CapacityError, MosaicError, OutOfRangeError
from services.admission import IngestCapacity
from services.errors import DeadlineError, NoFramesYetError, QueueFullError, UnavailableError
from services.ingest_queue import IngestQueues, QueuedFrame
from services.telemetry import WorkerTelemetry
from services.tier_sync import TierSync

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05
STATS_REFRESH_S = 0.5
DEFAULT_MAX_QUESTIONS_PER_STREAM = 4
RETRY_AFTER_S = 0.5  # the hint a refused question gets
DEFAULT_ANSWER_SLICE_S = 0.25
DEFAULT_INGEST_PAUSE_LAYERS = 4
DEFAULT_INGEST_PAUSE_FRAMES = 0
DEFAULT_INGEST_PAUSE_BLOCKS = 4
DEFAULT_INGEST_PAUSE_PLACED = 16
DEFAULT_QUESTIONS_ALONGSIDE_INGEST = False
DEFAULT_MAX_BACKGROUND_JOBS = 64
MAX_SERVE_ROUNDS = 4  # rounds of questions one pause starts, each round those that arrived during the one before
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
    low_priority: bool = False
    on_finish: object = None  # called on the engine thread with (job, error or None) once the job ends
    answering: bool = False  # an event has reached the caller, so the job can no longer start over
    waits_for_room_until: int = -1  # parked until more than this many running questions have finished
    submitted_s: float = 0.0  # time.monotonic() when the loop received it
    started_s: float = 0.0  # time.monotonic() when the engine began it (again, after a wait for device room)
    first_event_s: float = 0.0  # time.monotonic() when the engine thread handed its first event to the caller


@dataclass(slots=True)
class _Ahead:
    """Frames taken for the next ingest call, with their vision tower queued (None: the engine refused them, and
    the call checks them again)."""

    taken: list[QueuedFrame]
    encoded: EncodedFrames | None = None
    encode_s: float = 0.0  # the engine thread's time queuing the tower, less the questions' at its pauses


class EngineLoop:
    """Owns the engine thread.

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
        ingest_pause_layers: layers of an ingest forward pass between two chances to start questions; 0 starts
            them only between ingest calls.
        ingest_pause_frames: vision-tower frames between two such chances; 0 runs the tower over a call's frames
            at once.
        ingest_pause_blocks: vision-tower blocks between two such chances inside the tower (a block runs over all
            of a call's frames at once); 0 pauses only after it.
        ingest_pause_placed: frames placed into clusters between two such chances after a pass's language model;
            0 places all of them at once.
        ingest_pause_lookahead: at a pause the host waits until the device is at most this many chunks of ingest work
            (the work between two pauses) behind it.
        ingest_pause_skip_idle: a pause where no question waits to start is passed without waiting for the device.
        questions_alongside_ingest: on CUDA, questions started at a pause run on a high-priority stream beside the
            ingest work already queued, and the host does not wait at pauses; else the host waits at each pause
            until the device is ``ingest_pause_lookahead`` chunks behind, and the questions run behind them.
        encode_ahead: as an ingest call returns, the next call's frames are taken and their vision tower queued
            (module doc).
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
        if min(max_questions_per_stream, ingest_pause_lookahead) < 1 or min(answer_slice_s, *pause_settings) < 0:
            raise ValueError(
                f"max_questions_per_stream={max_questions_per_stream} and ingest_pause_lookahead="
                f"{ingest_pause_lookahead} must be >= 1, answer_slice_s={answer_slice_s}, ingest_pause_layers="
                f"{ingest_pause_layers}, ingest_pause_frames={ingest_pause_frames}, ingest_pause_blocks="
                f"{ingest_pause_blocks} and ingest_pause_placed={ingest_pause_placed} >= 0"
            )
        self.engine = engine
        self.queues = queues
        self.wake = queues.wake
        self.tier_sync = tier_sync
        self.telemetry = telemetry
        self.max_batch_frames = max_batch_frames
        self.retention_s = retention_s
        self.max_questions_per_stream = max_questions_per_stream
        self.after_ingest = after_ingest
        self.max_background_jobs = max_background_jobs
        self.max_background_running = max_background_running
        self.answer_slice_s = answer_slice_s
        self.ingest_pause_layers = ingest_pause_layers
        self.ingest_pause_frames = ingest_pause_frames
        self.ingest_pause_blocks = ingest_pause_blocks
        self.ingest_pause_placed = ingest_pause_placed
        self.ingest_pause_lookahead = ingest_pause_lookahead
        self.ingest_pause_skip_idle = ingest_pause_skip_idle
        self.questions_alongside_ingest = questions_alongside_ingest
        frames_per_pass = engine.config.max_frames_per_pass
        if encode_ahead and queues.max_frames_per_stream <= frames_per_pass:
            raise ValueError(
                f"encode_ahead needs ingest queues longer than the frames a call takes of one stream: "
                f"ingest_queue_frames={queues.max_frames_per_stream}, max_frames_per_pass={frames_per_pass}; with the "
                "frames taken ahead filling the bound, a new frame could not drop an older one"
            )
        if encode_ahead and engine.parts.model.device.type == "cuda" and engine.parts.tower_stream is None:
            log.warning(
                "encode_ahead is off: without the engine's tower_stream the next call's vision tower would be queued "
                "on the compute stream, ahead of every question between the calls"
            )
            encode_ahead = False
        self.encode_ahead = encode_ahead
        self._ahead: _Ahead | None = None  # the next call's frames, taken with their tower queued (encode_ahead)
        self._ingest_ended = False  # set by end_ingest as the worker shuts down
        self._served_in_pauses_s = 0.0  # engine-thread time spent on questions inside ingest calls and at their ends
        self._last_chance: tuple[str, float] | None = None  # the engine thread's last chance to start a question
        self._forward_passes = 0  # language-model passes of every ingest call so far
        self._background: deque[QuestionJob] = deque()
        self.stats = None  # latest EngineStats, refreshed every STATS_REFRESH_S
        self.last_ingested_s: dict[str, float] = {}  # stream -> timestamp of the newest ingested frame
        self.capacity = IngestCapacity()  # frames/s this engine has been seen to ingest, for admission
        self._stats_at = 0.0
        self._commands: deque[tuple[tuple, Future]] = deque()
        self._questions: list[QuestionJob] = []
        self._pending_questions: deque[QuestionJob] = deque()
        self._by_id: dict[str, QuestionJob] = {}
        self._jobs_lock = threading.Lock()
        self._num_jobs: dict[str, int] = defaultdict(int)  # stream -> questions running or waiting here
        self._questions_finished = 0  # running questions that ended, each giving its device room back
        self._stop = threading.Event()
        self._closed = False  # the engine thread has ended its questions and takes no more (under ``_jobs_lock``)
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

    def oldest_wait_s(self, stream_id: str) -> float:
        """The stream's ingest lag: seconds since its oldest frame still waiting for ingest arrived, in its queue or
        taken for the next call (``encode_ahead``)."""
        queued_s = self.queues.oldest_wait_s(stream_id)
        ahead = self._ahead  # read once: the engine thread replaces it, never changes its frames in place
        if ahead is None:
            return queued_s
        arrived = [f.received_s for f in ahead.taken if f.stream_id == stream_id]
        return max(queued_s, time.monotonic() - min(arrived)) if arrived else queued_s

    # -- engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self.wake.clear()
            try:
                worked = self._timed("other", self._run_commands)
                worked |= not self._ingest_ended and self._ingest_once()
                worked |= self._timed("questions", self._start_questions)
                worked |= self._step_questions()
                self._timed("other", self._refresh_stats)
            except Exception:
                log.exception("engine loop step failed")
                worked = False
            if not worked:
                self._timed("idle", self.wake.wait, IDLE_WAIT_S)
                self._last_chance = ("loop", time.monotonic())  # a question wakes the idle wait: no gap there
        with self._jobs_lock:  # no question is submitted after this sweep (``submit``)
            self._closed = True
            left = self._questions + list(self._pending_questions) + list(self._background)
        for job in left:
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

    def _timed(self, part: str, fn, *args):
        """``fn(*args)``, its time counted to ``part`` of the engine thread's time (telemetry)."""
        started_s = time.monotonic()
        try:
            return fn(*args)
        finally:
            self.telemetry.spent(part, time.monotonic() - started_s)

    def _ingest_once(self) -> bool:
        """One ingest call (module doc)."""
        started_s, served_before_s = time.monotonic(), self._served_in_pauses_s
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            self.queues.release(ahead.taken)  # out of the queue's bound from now, as a call's own frames are
        taken = ahead.taken if ahead is not None else self._take_call()
        if not taken:
            return False
        batch = [f for f in taken if f.stream_id in self.engine.streams]  # a stream deleted since its frames came
        ingest_s = 0.0
        try:
            ingest_s = self._ingest_batch(batch, ahead) if batch else 0.0
        finally:
            served_s = self._served_in_pauses_s - served_before_s  # counted to questions
            self.telemetry.spent("ingest", ingest_s)
            self.telemetry.spent("ingest_upkeep", time.monotonic() - started_s - ingest_s - served_s)
        return True

    def _take_call(self, *, hold: bool = False) -> list[QueuedFrame]:
        return self.queues.take_call(self.max_batch_frames, self.engine.config.max_frames_per_pass, hold=hold)

    def _ingest_batch(self, batch: list[QueuedFrame], ahead: _Ahead | None = None) -> float:
        """Ingests one batch (with ``ahead``, the frames taken and encoded ahead) and does what follows it, the next
        call's tower queued first with ``encode_ahead``; returns the seconds of the engine's ingest call and of that
        tower's queuing, less what questions took at its pauses (counted to questions)."""
        started_s, served_before_s = time.monotonic(), self._served_in_pauses_s
        passes_before = self._forward_passes
        if self.ingest_pause_layers:  # questions that came since the loop last started some go before this call
            self._serve_at_pause("call_start")
        ingested, used_ahead = self._ingest(batch, None if ahead is None else ahead.encoded)
        done_s = time.monotonic()
        served_s = self._served_in_pauses_s - served_before_s
        # Questions that came during the call start before its upkeep; the next call's tower is queued before them,
        # beside the language model just queued, unless one waits already: it goes first.
        serves = bool(self.ingest_pause_layers)
        if serves and self._pending_questions:
            self._serve_at_pause("call_end")
            serves = False
        next_encode_s = self._encode_next() if self.encode_ahead else 0.0
        if serves:
            self._serve_at_pause("call_end")
        self.telemetry.spent("questions", self._served_in_pauses_s - served_before_s)
        # the call's time, with its tower's where that was queued the call before
        ahead_s = ahead.encode_s if used_ahead else 0.0
        self.capacity.observe(len(ingested), done_s - started_s - served_s + ahead_s)
        per_stream: dict[str, int] = defaultdict(int)
        for frame in ingested:
            per_stream[frame.stream_id] += 1
            self.last_ingested_s[frame.stream_id] = frame.timestamp_s
        if ingested:
            self.telemetry.ingested_batch(
                per_stream,
                [done_s - f.received_s for f in ingested],
                forward_passes=self._forward_passes - passes_before,
                encoded_ahead=used_ahead,
            )
        streams = {f.stream_id for f in batch}
        self.tier_sync.flush(streams)
        for stream_id in streams:
            self.tier_sync.apply_retention(stream_id, self.retention_s(stream_id))
        if self.after_ingest is not None:
            try:
                self.after_ingest(streams)
            except Exception:
                log.exception("after-ingest hook failed")
        return done_s - started_s - served_s + next_encode_s

    def _new_pauses(self) -> IngestPauses | None:
        """The pauses of one ingest call, or of one batch's tower queued ahead (module doc); None: no pauses."""
        if not self.ingest_pause_layers:
            return None
        return IngestPauses(
            self._serve_at_pause,
            every_layers=self.ingest_pause_layers,
            vision_frames=self.ingest_pause_frames or None,
            vision_blocks=self.ingest_pause_blocks or None,
            placed_frames=self.ingest_pause_placed or None,
            lookahead=self.ingest_pause_lookahead,
            has_work=self._question_waits if self.ingest_pause_skip_idle else None,
            alongside=self.questions_alongside_ingest,
        )

    def _encode_next(self) -> float:
        """Takes the next call's frames and queues their vision tower now (``encode_ahead``), pausing where a call's
        tower would; returns the seconds it took, less what questions took at its pauses (counted to questions). A
        batch the engine refuses for one stream's frames is encoded without them, and one refused for no stream in
        particular is kept without its tower; either way the call checks it again (a refused batch changes no
        stream), and, refused, drops only the bad stream's frames."""
        started_s, served_before_s = time.monotonic(), self._served_in_pauses_s
        taken = self._take_call(hold=True)  # in their queues' bound until the call begins, so drops are not delayed
        if not taken:
            return 0.0
        self._ahead = _Ahead(taken)
        batch = [f for f in taken if f.stream_id in self.engine.streams]
        while batch:
            try:
                self._ahead.encoded = self.engine.encode_ahead(_frame_inputs(batch), pauses=self._new_pauses())
                break
            except MosaicError as err:
                # One camera's refused frames must not cost the others their tower ahead: encoded without them,
                # the call refuses and counts them, then ingests the rest with this tower (``_ingest``).
                log.debug("the next call's frames were not encoded ahead: %s", err)
                if err.stream_id is None:
                    break
                batch = [f for f in batch if f.stream_id != err.stream_id]
            except Exception:
                log.warning("encoding the next call's frames ahead failed; the call encodes its own", exc_info=True)
                break
        self._ahead.encode_s = time.monotonic() - started_s - (self._served_in_pauses_s - served_before_s)
        return self._ahead.encode_s

    def _ingest(self, batch: list[QueuedFrame], encoded: EncodedFrames | None = None) -> tuple[list[QueuedFrame], bool]:
        """Ingests the batch (with ``encoded``, its vision tower queued ahead). The engine checks a whole batch
        before changing anything, so one bad camera only loses its own frames: if the engine refuses the batch
        because of one stream's frames (``MosaicError.stream_id``), those are dropped and the rest go again in one
        call; if the refusal names no stream, each stream goes again in a call of its own. A stream whose oldest
        frames found no room to leave its window has its frames after them refused by the call itself
        (``IngestResult.refused``); those are dropped too. Returns the frames ingested and whether the engine used
        ``encoded``."""
        while batch:
            try:
                result = self.engine.ingest(_frame_inputs(batch), pauses=self._new_pauses(), encoded=encoded)
                self._forward_passes += result.num_forward_passes
                return self._drop_not_taken(batch, result), result.encoded_ahead
            except Exception as err:
                streams = {f.stream_id for f in batch}
                refused = next(iter(streams)) if len(streams) == 1 else getattr(err, "stream_id", None)
                if refused not in streams:
                    break
                self._drop_refused([f for f in batch if f.stream_id == refused], err)
                batch = [f for f in batch if f.stream_id != refused]  # ``encoded`` is used only if it is for these
        if not batch:
            return [], False
        by_stream: dict[str, list[QueuedFrame]] = defaultdict(list)
        for frame in batch:
            by_stream[frame.stream_id].append(frame)
        return [f for frames in by_stream.values() for f in self._ingest(frames)[0]], False

    def _drop_not_taken(self, batch: list[QueuedFrame], result: IngestResult) -> list[QueuedFrame]:
        """The batch less each stream's last frames that the engine did not take in (``IngestResult.refused``),
        those counted as dropped for want of room."""
        not_taken: set[int] = set()
        for stream_id, num_refused in result.refused.items():
            refused = [f for f in batch if f.stream_id == stream_id][-num_refused:]
            self._drop_refused(refused, CapacityError(result.held_back[stream_id]))
            not_taken.update(id(f) for f in refused)
        return [f for f in batch if id(f) not in not_taken]

    def _drop_refused(self, frames: list[QueuedFrame], err: BaseException) -> None:
        """Counts one stream's frames that the engine refused as dropped, with why."""
        # no_room: no tier had room, or its stream's oldest frames could not be stored yet (a disk that refused a
        # spill, a failed host allocation; the log line says which)
        reason = "no_room" if isinstance(err, CapacityError) else "invalid"
        log.warning("dropping %d frames of stream %s: %s", len(frames), frames[0].stream_id, err)
        self.telemetry.dropped(frames[0].stream_id, reason, len(frames))

    def _serve_at_pause(self, chance: str = "pause") -> None:
        """At a pause inside an ingest call, at its start (``chance`` "call_start") or at its end before its upkeep
        ("call_end"): starts the questions that arrived and runs each one's prefill and first token (module doc).
        Questions that arrive meanwhile start at the same pause, after them (up to ``MAX_SERVE_ROUNDS`` rounds), not
        at the next one, a chunk of ingest work later. Background answers, commands, later tokens and questions
        about a stream with no frames yet wait for the loop."""
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
            self._served_in_pauses_s += time.monotonic() - started_s

    def _question_waits(self) -> bool:
        return bool(self._pending_questions)

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

    def _start_questions(self) -> bool:
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
                self._finish(job, QuestionCancelled(f"stream {job.stream_id!r} was deleted"))
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

    def _step_questions(self) -> bool:
        """A token of every running question, then more while the answer slice allows (module doc); commands
        and new questions that arrive meanwhile are served in between."""
        if not self._questions:
            return False
        slice_ends_s = time.monotonic() + self.answer_slice_s
        while True:
            self._timed("questions", self._step_running)
            if not self._questions or self._stop.is_set():
                return True
            if time.monotonic() >= slice_ends_s and (self.queues.total_frames() > 0 or self._ahead is not None):
                return True
            self._timed("other", self._run_commands)
            self._timed("questions", self._start_questions)
            self._timed("other", self._refresh_stats)

    def _step_running(self) -> None:
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

    def _refresh_stats(self) -> None:
        now = time.monotonic()
        if now - self._stats_at >= STATS_REFRESH_S:
            self._stats_at = now
            self.stats = self.engine.stats()

    def end_ingest(self, deadline_s: float) -> dict[str, int]:
        """Engine thread only, as the worker shuts down: ingests the frames queued and taken ahead until none is
        left or ``time.monotonic()`` passes ``deadline_s``, then ingests no more, so that a checkpoint after it is
        the stream's last state. Returns the frames left, per stream, taken out of their queues: the caller counts
        them dropped."""
        while time.monotonic() < deadline_s and (self._ahead is not None or self.queues.total_frames() > 0):
            self._ingest_once()
        self._ingest_ended = True
        left = self.queues.take_all()
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            self.queues.release(ahead.taken)
            left += ahead.taken
        return dict(Counter(frame.stream_id for frame in left))

    def drop_ahead(self, stream_id: str) -> int:
        """Drops the stream's frames taken for the next call (``encode_ahead``; engine thread only, as the stream
        closes, so that a stream opened again under its id never gets them); returns how many. The next call then
        queues its own tower for the frames left."""
        ahead = self._ahead
        if ahead is None:
            return 0
        kept = [f for f in ahead.taken if f.stream_id != stream_id]
        if len(kept) < len(ahead.taken):
            self.queues.release([f for f in ahead.taken if f.stream_id == stream_id])
            self._ahead = _Ahead(kept) if kept else None
        return len(ahead.taken) - len(kept)

    def cancel_stream_questions(self, stream_id: str) -> None:
        """Ends the stream's questions now (engine thread only): used before the stream closes."""
        everything = self._questions + list(self._pending_questions) + list(self._background)
        for job in [j for j in everything if j.stream_id == stream_id]:
            if job in self._pending_questions:
                self._pending_questions.remove(job)
            if job in self._background:
                self._background.remove(job)
            self._finish(job, QuestionCancelled(f"stream {stream_id!r} was deleted"))


def _frame_inputs(batch: list[QueuedFrame]) -> list[FrameInput]:
    return [FrameInput(f.stream_id, f.timestamp_s, f.rgb) for f in batch]
