"""One stream as its worker holds it: its record, its source, its clock, and the checks that guard it.

Plain Python, no engine: the worker asks a session whether a pushed frame or a question may go through.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from mosaic_core.errors import InvalidArgumentError, StateError
from services.errors import NoFramesYetError
from services.ingest_queue import MAX_TIMESTAMP_S
from services.metadata.base import StreamRecord
from services.sources import SourceReader, SourceState

EPOCH_THRESHOLD_S = 1e9  # timestamps above this are Unix time; below, seconds since the stream started


@dataclass(slots=True)
class StreamSession:
    record: StreamRecord
    source: SourceReader | None = None
    anchor: tuple[float, float] | None = None  # (monotonic at first frame, its timestamp)
    last_offered_s: float | None = None  # newest timestamp accepted into the queue
    clock_epoch_unix: float | None = None  # wall-clock time at which a pulled source's clock read 0

    @property
    def stream_id(self) -> str:
        return self.record.stream_id

    def check_push(self, timestamp_s: float, *, now: float, max_skew_s: float) -> None:
        """A pushed frame must belong to a pushed stream, come after the last one, and not run far ahead.

        Raises:
            StateError: the stream pulls from a source (FAILED_PRECONDITION).
            InvalidArgumentError: the timestamp is not finite or not within ``MAX_TIMESTAMP_S`` of 0, does not
                increase, or is more than ``max_skew_s`` ahead.
        """
        if self.source is not None:
            raise StateError(
                f"stream {self.stream_id!r} pulls frames from its source; it does not accept pushed frames"
            )
        if not (math.isfinite(timestamp_s) and abs(timestamp_s) <= MAX_TIMESTAMP_S):
            raise InvalidArgumentError(
                f"stream {self.stream_id!r}: a frame's timestamp must be finite and within {MAX_TIMESTAMP_S:g} s of 0 "
                f"(seconds since the stream started, or Unix time), not {timestamp_s}"
            )
        if self.last_offered_s is not None and not timestamp_s > self.last_offered_s:
            raise InvalidArgumentError(
                f"stream {self.stream_id!r}: frame timestamp {timestamp_s:.3f}s is not after the previous frame's "
                f"{self.last_offered_s:.3f}s; timestamps must increase"
            )
        # The stream's clock: real time since its first frame (or Unix time), but never behind its newest frame,
        # so a client may push recorded video faster than real time in small steps; one wild jump is refused.
        if timestamp_s >= EPOCH_THRESHOLD_S:
            clock_s = time.time()
        elif self.anchor is not None:
            clock_s = self.anchor[1] + (now - self.anchor[0])
        else:
            return  # the first frame of a stream sets its clock
        clock_s = max(clock_s, self.last_offered_s or clock_s)
        if timestamp_s > clock_s + max_skew_s:
            raise InvalidArgumentError(
                f"stream {self.stream_id!r}: frame timestamp {timestamp_s:.3f}s is {timestamp_s - clock_s:.1f}s "
                f"ahead of the stream's clock ({clock_s:.3f}s); at most {max_skew_s:g}s ahead is accepted"
            )

    def check_answerable(self, frames_ingested: int) -> None:
        """A stream with no history cannot answer: say why instead of answering with no evidence.

        A source that failed after frames arrived does not block questions about what was seen before.

        Raises:
            NoFramesYetError: no frame was ingested yet (FAILED_PRECONDITION), naming the source's error if it
                failed; a question over several streams skips such a stream.
        """
        if frames_ingested > 0:
            return
        progress = self.source.progress() if self.source is not None else None
        if progress is not None and progress.state is SourceState.ERROR:
            raise NoFramesYetError(
                f"stream {self.stream_id!r} has ingested no frames: its source failed ({progress.error})"
            )
        raise NoFramesYetError(
            f"stream {self.stream_id!r} has ingested no frames yet, so there is nothing to answer from; "
            "ask again once its first frames are in (GetStream shows frames_ingested)"
        )
