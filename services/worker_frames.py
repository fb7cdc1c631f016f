"""Frames into a worker's ingest queues (``FrameIntake``): pushed ones checked against their stream's clock and
sampled to its fps here, a pulled source's as its reader sampled them; each counted in its stream's telemetry."""

from __future__ import annotations

import logging
import time

import numpy as np

from mosaic_core.errors import InvalidArgumentError, MosaicError, UnknownStreamError
from mosaic_core.model.pixels import validate_frames
from services.config import ServiceConfig
from services.ingest_queue import IngestQueues, PutOutcome, QueuedFrame
from services.session import StreamSession
from services.stream_metrics import DROP_REASONS
from services.telemetry import WorkerTelemetry
from services.worker_results import FrameRejection, PushResult

log = logging.getLogger(__name__)


class FrameIntake:
    """Queues one worker's frames and counts them.

    Args:
        config: the service's settings (``max_push_skew_s``).
        engine: the worker's engine (where a pulled stream's clock started is written to its state at its first frame).
        queues: the worker's bounded ingest queues.
        telemetry: the worker's per-stream counters.
        sessions: the worker's open streams, shared with the worker (a frame of a stream not in it is refused).
    """

    def __init__(
        self,
        config: ServiceConfig,
        engine,
        queues: IngestQueues,
        telemetry: WorkerTelemetry,
        sessions: dict[str, StreamSession],
    ) -> None:
        self.config = config
        self.engine = engine
        self.queues = queues
        self.telemetry = telemetry
        self.sessions = sessions

    def count_dropped(self, stream_id: str, reason: str) -> None:
        """A frame of ``stream_id`` dropped before it reached the worker: counted in the stream's totals (a stream not
        open here counts nothing)."""
        if reason not in DROP_REASONS:
            raise InvalidArgumentError(f"unknown drop reason {reason!r}; one of {', '.join(DROP_REASONS)}")
        if stream_id in self.sessions:
            self.telemetry.dropped(stream_id, reason)

    def push(self, frames: list[tuple[int, str, float, np.ndarray | None]]) -> PushResult:
        """Queues decoded frames ``(index in the call, stream, timestamp_s, rgb)``; never raises per frame.

        ``accepted`` counts the frames queued (as GetStream's ``frames_received`` does), ``rejected`` the refused and
        ``sampled_out`` those in a 1/fps slot of their stream's grid that an earlier frame took (``IngestQueues.put``).
        A frame without its pixels (``rgb`` None: the router guessed it sampled out) is checked as a whole one would be;
        where it would be queued, nothing changes and its index goes in ``needs_pixels``. ``grids`` gives each stream's
        sampling grid after the call.
        """
        result = PushResult()
        for index, stream_id, timestamp_s, rgb in frames:
            try:
                if rgb is None:
                    outcome = self.sample_out(stream_id, timestamp_s)
                else:
                    outcome = self.offer(stream_id, timestamp_s, rgb, pushed=True)
            except MosaicError as err:
                result.rejected.append(FrameRejection(index, stream_id, str(err), err.grpc_code))
                if stream_id in self.sessions:
                    self.telemetry.dropped(stream_id, "invalid")
                continue
            if outcome is None:
                result.needs_pixels.append(index)
                continue
            if outcome is PutOutcome.SAMPLED_OUT:
                result.sampled_out += 1
                continue
            result.accepted += 1
            result.dropped += outcome is PutOutcome.QUEUED_DROPPED_OLDEST
        for stream_id in {stream_id for _, stream_id, _, _ in frames}:
            if (grid := self.queues.grid(stream_id)) is not None:
                result.grids[stream_id] = grid
        return result

    def sample_out(self, stream_id: str, timestamp_s: float) -> PutOutcome | None:
        """A pushed frame of ``stream_id`` without its pixels, through ``offer``'s checks: SAMPLED_OUT where its slot is
        taken, None (its pixels are needed, nothing changed) where it would be queued."""
        session = self.sessions.get(stream_id)
        if session is None:
            raise UnknownStreamError(f"unknown stream {stream_id!r}")
        session.check_push(timestamp_s, now=time.monotonic(), max_skew_s=self.config.max_push_skew_s)
        return PutOutcome.SAMPLED_OUT if self.queues.sample_out(stream_id, timestamp_s) else None

    def offer(self, stream_id: str, timestamp_s: float, rgb: np.ndarray, *, pushed: bool = False) -> PutOutcome:
        """Queues one frame of ``stream_id``: a pushed one (``pushed``) or one of its pulled source's."""
        session = self.sessions.get(stream_id)
        if session is None:
            raise UnknownStreamError(f"unknown stream {stream_id!r}")
        now = time.monotonic()
        if pushed:
            session.check_push(timestamp_s, now=now, max_skew_s=self.config.max_push_skew_s)
        rgb = validate_frames(rgb)[0]  # a bad frame is refused here, never reaching a shared batch
        if not pushed and session.clock_epoch_unix is None:
            self._start_clock(session, timestamp_s)
        # A source reader's frames come sampled to the stream's fps; only pushed ones are sampled here.
        outcome = self.queues.put(QueuedFrame(stream_id, timestamp_s, rgb, now), presampled=not pushed)
        if outcome is PutOutcome.SAMPLED_OUT:
            return outcome
        session.last_offered_s = timestamp_s
        if session.anchor is None:
            session.anchor = (now, timestamp_s)
        self.telemetry.received(stream_id)
        if outcome is PutOutcome.QUEUED_DROPPED_OLDEST:
            self.telemetry.dropped(stream_id, "queue_full")
        return outcome

    def _start_clock(self, session: StreamSession, timestamp_s: float) -> None:
        """A pulled stream's first frame maps its clock to the wall clock (``clock_epoch_unix``), on disk before the
        frame is queued: a worker restarted before the next saved state, or before the frame's ingest, goes on with
        this clock (``WorkerStreams._start_source``). A write that fails is logged; the start is saved with the
        stream's next state."""
        session.clock_epoch_unix = time.time() - timestamp_s
        try:
            self.engine.write_stream_state(session.stream_id, clock_epoch_unix=session.clock_epoch_unix)
        except OSError as err:
            log.error("stream %s: where its source's clock started is not on disk yet (%s); a restart before the "
                      "next saved state starts the clock again", session.stream_id, err)  # fmt: skip
