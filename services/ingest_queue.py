"""Per-stream bounded ingest queues with drop-oldest, fps sampling, and oldest-first call taking.

Plain Python and thread-safe: producers (PushFrames, source readers) call ``put`` from any thread, the
worker's engine loop calls ``take_call``. A full queue drops its *oldest* frame, because for a live
camera the newest frame is the one worth encoding; every drop is counted by the caller.

Sampling to the stream's fps runs on a grid anchored at the stream's first frame: frame ``t`` is kept when
``floor((t - t0) * fps)`` is larger than that of the last kept frame, so 25 fps pushed into a 5 fps stream
keeps every fifth frame without drift (``services.push_sampling``, where the router's guess of it is too). A pushed
frame the router sent without its pixels, guessing it sampled out, is decided by ``sample_out`` as ``put`` would.
That grid is for pushed frames: a source reader's frames arrive sampled to the stream's fps already
(``put(..., presampled=True)``) and are all queued, since a second grid, with its own anchor and margin, would refuse
some frames the reader kept.

**How far behind a stream is** (``oldest_wait_s``) is measured from the arrival of the oldest frame still
waiting, and frames dropped while waiting do not reset it: a stream whose queue keeps overflowing because
ingest does not reach it reports a lag that keeps growing, not the age of its newest frames.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from mosaic_core.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    TimestampOrderError,
    UnknownStreamError,
)
from services.push_sampling import SamplingGrid, grid_slot

# A frame's timestamp (seconds since its stream started, or Unix time) lies within this of 0: about 3,000 years,
# far enough for any clock, near enough that the sampling grid's arithmetic stays finite.
MAX_TIMESTAMP_S = 1e11


class PutOutcome(Enum):
    """What happened to one offered frame."""

    QUEUED = "queued"  # queued, nothing dropped
    QUEUED_DROPPED_OLDEST = "queued_dropped_oldest"  # queued, and the oldest queued frame was dropped
    SAMPLED_OUT = "sampled_out"  # too close to the last kept frame for the stream's fps; not an error


@dataclass(slots=True)
class QueuedFrame:
    stream_id: str
    timestamp_s: float
    rgb: np.ndarray  # [H, W, 3] uint8
    received_s: float  # time.monotonic() when the frame arrived, for ingest latency


@dataclass(slots=True)
class _StreamQueue:
    fps: float
    frames: deque[QueuedFrame] = field(default_factory=deque)
    first_timestamp_s: float | None = None
    last_timestamp_s: float | None = None
    last_slot: int = -1
    # Arrival (time.monotonic()) of the oldest frame not yet taken by ingest, dropped ones included; None
    # when nothing waits.
    behind_since_s: float | None = None
    held: int = 0  # frames taken with ``hold``, still counted against the bound until released

    @property
    def waiting(self) -> int:
        """Frames waiting for ingest, those taken with ``hold`` included: what counts against the bound."""
        return len(self.frames) + self.held


class IngestQueues:
    """Bounded FIFO per stream; ``wake`` is set whenever a frame is queued.

    Args:
        max_frames_per_stream: queue bound; the oldest frame is dropped to admit a new one beyond it.
        wake: event the engine loop sleeps on.
    """

    def __init__(self, max_frames_per_stream: int, wake: threading.Event | None = None) -> None:
        if max_frames_per_stream < 1:
            raise InvalidArgumentError(f"max_frames_per_stream must be >= 1, got {max_frames_per_stream}")
        self.max_frames_per_stream = max_frames_per_stream
        self.wake = wake or threading.Event()
        self._lock = threading.Lock()
        self._queues: dict[str, _StreamQueue] = {}

    def add_stream(self, stream_id: str, fps: float) -> None:
        with self._lock:
            if stream_id in self._queues:
                raise AlreadyExistsError(f"stream {stream_id!r} already has an ingest queue")
            self._queues[stream_id] = _StreamQueue(fps=fps)

    def remove_stream(self, stream_id: str) -> int:
        """Forgets the stream; returns how many queued frames were discarded with it."""
        with self._lock:
            queue = self._queues.pop(stream_id, None)
            return 0 if queue is None else len(queue.frames)

    def put(self, frame: QueuedFrame, *, presampled: bool = False) -> PutOutcome:
        """Offers one frame; ``presampled`` when its producer sampled it to the stream's fps already (a source
        reader): it is then queued whatever the grid says, never SAMPLED_OUT.

        Raises:
            InvalidArgumentError: the timestamp is not finite, or not within ``MAX_TIMESTAMP_S`` of 0.
            UnknownStreamError: the stream has no queue on this worker.
            TimestampOrderError: the timestamp is not after the stream's previous frame.
        """
        with self._lock:
            queue, slot = self._next_slot(frame.stream_id, frame.timestamp_s)
            queue.last_timestamp_s = frame.timestamp_s
            queue.first_timestamp_s = frame.timestamp_s if queue.first_timestamp_s is None else queue.first_timestamp_s
            if slot <= queue.last_slot and not presampled:
                return PutOutcome.SAMPLED_OUT
            queue.last_slot = slot
            dropped = bool(queue.frames) and queue.waiting >= self.max_frames_per_stream
            if dropped:
                queue.frames.popleft()
            queue.frames.append(frame)
            if queue.behind_since_s is None:
                queue.behind_since_s = frame.received_s
        self.wake.set()
        return PutOutcome.QUEUED_DROPPED_OLDEST if dropped else PutOutcome.QUEUED

    def sample_out(self, stream_id: str, timestamp_s: float) -> bool:
        """A pushed frame known by its timestamp only: True, with the stream's grid left as ``put`` leaves it, when
        ``put`` would sample it out; False, nothing changed, when ``put`` would queue it (its pixels are needed).

        Raises:
            as ``put``, for the same frames.
        """
        with self._lock:
            queue, slot = self._next_slot(stream_id, timestamp_s)
            if slot > queue.last_slot:
                return False
            queue.last_timestamp_s = timestamp_s
            return True

    def grid(self, stream_id: str) -> SamplingGrid | None:
        """The stream's sampling grid as its next frame meets it; None before its first frame or for no such stream."""
        with self._lock:
            queue = self._queues.get(stream_id)
            if queue is None or queue.first_timestamp_s is None:
                return None
            return SamplingGrid(
                fps=queue.fps,
                first_timestamp_s=queue.first_timestamp_s,
                last_slot=queue.last_slot,
                last_timestamp_s=queue.last_timestamp_s,
            )

    def _next_slot(self, stream_id: str, timestamp_s: float) -> tuple[_StreamQueue, int]:
        """The stream's queue and the slot of its next frame at ``timestamp_s``, once the frame passed ``put``'s checks;
        under the lock."""
        if not (math.isfinite(timestamp_s) and abs(timestamp_s) <= MAX_TIMESTAMP_S):
            raise InvalidArgumentError(
                f"frame timestamp {timestamp_s!r} must be finite and within {MAX_TIMESTAMP_S:g} s of 0"
            )
        queue = self._queues.get(stream_id)
        if queue is None:
            raise UnknownStreamError(f"unknown stream {stream_id!r}")
        last = queue.last_timestamp_s
        if last is not None and not timestamp_s > last:
            raise TimestampOrderError(
                f"stream {stream_id!r}: timestamp {timestamp_s:.3f}s is not after the "
                f"previous frame's {last:.3f}s; timestamps must increase"
            )
        first = timestamp_s if queue.first_timestamp_s is None else queue.first_timestamp_s
        return queue, grid_slot(timestamp_s, first, queue.fps)

    def take_call(self, max_frames: int, frames_per_stream: int = 1, *, hold: bool = False) -> list[QueuedFrame]:
        """Frames for one ingest call: the streams longest behind (``oldest_wait_s``) first, up to ``max_frames``.

        Each stream gives up to ``frames_per_stream`` of its oldest frames, the frames one engine row carries, so
        a call never holds more of one stream than one forward pass takes, and it is one pass of rows from
        different streams. A stream left out because the call was full is further behind than those taken, so with N
        streams waiting every stream is reached within ``ceil(N * frames_per_stream / max_frames)`` calls.

        With ``hold`` the frames are taken early, for a call that has not begun (the engine loop's ``encode_ahead``):
        they still count against their queues' bound until ``release``, so a full queue drops its oldest frame
        when it would have without them taken.
        """
        if min(max_frames, frames_per_stream) < 1:
            raise InvalidArgumentError(
                f"max_frames={max_frames} and frames_per_stream={frames_per_stream} must be >= 1"
            )
        taken: list[QueuedFrame] = []
        with self._lock:
            waiting = [queue for queue in self._queues.values() if queue.frames]
            waiting.sort(key=lambda queue: queue.behind_since_s)  # the longest behind first, drops included
            for queue in waiting:
                room = max_frames - len(taken)
                if room <= 0:
                    break
                count = min(frames_per_stream, room, len(queue.frames))
                for _ in range(count):
                    taken.append(queue.frames.popleft())
                if hold:
                    queue.held += count
                queue.behind_since_s = queue.frames[0].received_s if queue.frames else None
        return taken

    def release(self, frames: list[QueuedFrame]) -> None:
        """Stops counting frames taken with ``hold`` against their queues' bound: their call has begun, or they were
        dropped. A stream removed since has nothing to release."""
        with self._lock:
            for frame in frames:
                queue = self._queues.get(frame.stream_id)
                if queue is not None and queue.held > 0:
                    queue.held -= 1

    def oldest_wait_s(self, stream_id: str, now_s: float | None = None) -> float:
        """Seconds since the oldest frame still waiting for ingest arrived (dropped ones count); 0 if none.

        This is the stream's ingest lag: it grows while ingest does not reach the stream.
        """
        with self._lock:
            queue = self._queues.get(stream_id)
            if queue is None or queue.behind_since_s is None:
                return 0.0
            return max(0.0, (time.monotonic() if now_s is None else now_s) - queue.behind_since_s)

    def oldest_received_s(self, stream_id: str) -> float | None:
        """Arrival time of the oldest frame still queued for the stream, or None when none is."""
        with self._lock:
            queue = self._queues.get(stream_id)
            return queue.frames[0].received_s if queue is not None and queue.frames else None

    def depth(self, stream_id: str) -> int:
        """The stream's frames waiting for ingest, those taken with ``hold`` included."""
        with self._lock:
            queue = self._queues.get(stream_id)
            return 0 if queue is None else queue.waiting

    def depths(self) -> dict[str, int]:
        """``depth`` of every stream."""
        with self._lock:
            return {s: q.waiting for s, q in self._queues.items()}

    def take_all(self) -> list[QueuedFrame]:
        """Every queued frame, taken out of its queue (a worker that stops ingesting counts them dropped)."""
        taken: list[QueuedFrame] = []
        with self._lock:
            for queue in self._queues.values():
                taken.extend(queue.frames)
                queue.frames.clear()
                queue.behind_since_s = None
        return taken

    def total_frames(self, *, exclude: frozenset[str] = frozenset()) -> int:
        with self._lock:
            return sum(len(q.frames) for s, q in self._queues.items() if s not in exclude)
