"""The engine loop's ingest calls: the frames each takes, the engine call, the frames refused, and the upkeep after.

**Every ingest call holds one row of frames per stream**, so it is one forward pass where the streams' frames are of
about one size (the engine gives rows of far fewer tokens a pass of their own). A call that held two frames of one
stream would take two passes, the second only as wide as the streams that had two, and narrow passes cost far more a
frame than wide ones (bench/NOTES.md, session 16). A stream left out of a full call is among the furthest behind at
the next, so every stream is reached within ``ceil(streams / max_batch_frames)`` calls.

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

After each ingest call ``after_ingest(stream_ids)`` runs on the engine thread (watch evaluation).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

from mosaic_core.engine.ingest_pauses import IngestPauses
from mosaic_core.engine.results import FrameInput, IngestResult
from mosaic_core.engine.tower import EncodedFrames
from mosaic_core.errors import CapacityError, MosaicError
from services.admission import IngestCapacity
from services.ingest_queue import IngestQueues, QueuedFrame
from services.question_runner import QuestionRunner
from services.telemetry import WorkerTelemetry
from services.tier_sync import TierSync

log = logging.getLogger(__name__)
DEFAULT_INGEST_PAUSE_LAYERS = 4
DEFAULT_INGEST_PAUSE_FRAMES = 0
DEFAULT_INGEST_PAUSE_BLOCKS = 4
DEFAULT_INGEST_PAUSE_PLACED = 16
DEFAULT_QUESTIONS_ALONGSIDE_INGEST = False


@dataclass(slots=True)
class _Ahead:
    """Frames taken for the next ingest call, with their vision tower queued (None: the engine refused them, and
    the call checks them again)."""

    taken: list[QueuedFrame]
    encoded: EncodedFrames | None = None
    encode_s: float = 0.0  # the engine thread's time queuing the tower, less the questions' at its pauses


class IngestCalls:
    """The ingest calls of one worker's engine thread (engine thread only, except ``oldest_wait_s``).

    Args:
        engine: the worker's engine.
        queues: per-stream ingest queues.
        tier_sync: mirrors clusters into the metadata store after each call, and applies retention.
        telemetry: counts ingested and dropped frames, batch sizes, and the engine thread's time by part.
        questions: the questions started at the calls' pauses.
        max_batch_frames: frames per ingest call.
        retention_s: returns a stream's retention (0 keeps everything), read at each retention pass.
        after_ingest: called on the engine thread with the ids of the streams of each ingest call.
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
        questions: QuestionRunner,
        *,
        max_batch_frames: int,
        retention_s,
        after_ingest=None,
        ingest_pause_layers: int = DEFAULT_INGEST_PAUSE_LAYERS,
        ingest_pause_frames: int = DEFAULT_INGEST_PAUSE_FRAMES,
        ingest_pause_blocks: int = DEFAULT_INGEST_PAUSE_BLOCKS,
        ingest_pause_placed: int = DEFAULT_INGEST_PAUSE_PLACED,
        ingest_pause_lookahead: int = 1,
        ingest_pause_skip_idle: bool = False,
        questions_alongside_ingest: bool = DEFAULT_QUESTIONS_ALONGSIDE_INGEST,
        encode_ahead: bool = False,
    ) -> None:
        self.engine = engine
        self.queues = queues
        self.tier_sync = tier_sync
        self.telemetry = telemetry
        self.questions = questions
        self.max_batch_frames = max_batch_frames
        self.retention_s = retention_s
        self.after_ingest = after_ingest
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
        self.ended = False  # set by end_ingest as the worker shuts down
        self._forward_passes = 0  # language-model passes of every ingest call so far
        self.capacity = IngestCapacity()  # frames/s this engine has been seen to ingest, for admission

    def has_ahead(self) -> bool:
        """Whether frames are taken for the next call (``encode_ahead``)."""
        return self._ahead is not None

    def oldest_wait_s(self, stream_id: str) -> float:
        """The stream's ingest lag: seconds since its oldest frame still waiting for ingest arrived, in its queue or
        taken for the next call (``encode_ahead``). Any thread."""
        queued_s = self.queues.oldest_wait_s(stream_id)
        ahead = self._ahead  # read once: the engine thread replaces it, never changes its frames in place
        if ahead is None:
            return queued_s
        arrived = [f.received_s for f in ahead.taken if f.stream_id == stream_id]
        return max(queued_s, time.monotonic() - min(arrived)) if arrived else queued_s

    def ingest_once(self) -> bool:
        """One ingest call (module doc)."""
        started_s, served_before_s = time.monotonic(), self.questions.served_in_pauses_s
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
            served_s = self.questions.served_in_pauses_s - served_before_s  # counted to questions
            self.telemetry.spent("ingest", ingest_s)
            self.telemetry.spent("ingest_upkeep", time.monotonic() - started_s - ingest_s - served_s)
        return True

    def _take_call(self, *, hold: bool = False) -> list[QueuedFrame]:
        return self.queues.take_call(self.max_batch_frames, self.engine.config.max_frames_per_pass, hold=hold)

    def _ingest_batch(self, batch: list[QueuedFrame], ahead: _Ahead | None = None) -> float:
        """Ingests one batch (with ``ahead``, the frames taken and encoded ahead) and does what follows it, the next
        call's tower queued first with ``encode_ahead``; returns the seconds of the engine's ingest call and of that
        tower's queuing, less what questions took at its pauses (counted to questions)."""
        started_s, served_before_s = time.monotonic(), self.questions.served_in_pauses_s
        passes_before = self._forward_passes
        if self.ingest_pause_layers:  # questions that came since the loop last started some go before this call
            self.questions.serve_at_pause("call_start")
        ingested, used_ahead = self._ingest(batch, None if ahead is None else ahead.encoded)
        done_s = time.monotonic()
        served_s = self.questions.served_in_pauses_s - served_before_s
        # Questions that came during the call start before its upkeep; the next call's tower is queued before them,
        # beside the language model just queued, unless one waits already: it goes first.
        serves = bool(self.ingest_pause_layers)
        if serves and self.questions.question_waits():
            self.questions.serve_at_pause("call_end")
            serves = False
        next_encode_s = self._encode_next() if self.encode_ahead else 0.0
        if serves:
            self.questions.serve_at_pause("call_end")
        self.telemetry.spent("questions", self.questions.served_in_pauses_s - served_before_s)
        # the call's time, with its tower's where that was queued the call before
        ahead_s = ahead.encode_s if used_ahead else 0.0
        self.capacity.observe(len(ingested), done_s - started_s - served_s + ahead_s)
        per_stream: dict[str, int] = defaultdict(int)
        for frame in ingested:
            per_stream[frame.stream_id] += 1
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
        """The pauses of one ingest call, or of one batch's tower queued ahead (``services.engine_loop``); None: no
        pauses."""
        if not self.ingest_pause_layers:
            return None
        return IngestPauses(
            self.questions.serve_at_pause,
            every_layers=self.ingest_pause_layers,
            vision_frames=self.ingest_pause_frames or None,
            vision_blocks=self.ingest_pause_blocks or None,
            placed_frames=self.ingest_pause_placed or None,
            lookahead=self.ingest_pause_lookahead,
            has_work=self.questions.question_waits if self.ingest_pause_skip_idle else None,
            alongside=self.questions_alongside_ingest,
        )

    def _encode_next(self) -> float:
        """Takes the next call's frames and queues their vision tower now (``encode_ahead``), pausing where a call's
        tower would; returns the seconds it took, less what questions took at its pauses (counted to questions). A
        batch the engine refuses for one stream's frames is encoded without them, and one refused for no stream in
        particular is kept without its tower; either way the call checks it again (a refused batch changes no
        stream), and, refused, drops only the bad stream's frames."""
        started_s, served_before_s = time.monotonic(), self.questions.served_in_pauses_s
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
        self._ahead.encode_s = time.monotonic() - started_s - (self.questions.served_in_pauses_s - served_before_s)
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

    def end_ingest(self, deadline_s: float) -> dict[str, int]:
        """Engine thread only, as the worker shuts down: ingests the frames queued and taken ahead until none is
        left or ``time.monotonic()`` passes ``deadline_s``, then ingests no more, so that a checkpoint after it is
        the stream's last state. Returns the frames left, per stream, taken out of their queues: the caller counts
        them dropped."""
        while time.monotonic() < deadline_s and (self._ahead is not None or self.queues.total_frames() > 0):
            self.ingest_once()
        self.ended = True
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


def _frame_inputs(batch: list[QueuedFrame]) -> list[FrameInput]:
    return [FrameInput(f.stream_id, f.timestamp_s, f.rgb) for f in batch]
