"""Admission by compute: how many frames per second a worker has been seen to ingest, and whether a new stream
still fits.

Throughput grows with batch size (frames of many streams share a forward pass), so the worker keeps the median of
the last few rates per batch size and trusts the best batch size measured enough times. That is conservative: a
worker that has only run small batches underestimates itself, and learns more as streams are added; and one call
timed short (say, its time nearly all spent serving questions, which is not counted as ingest) does not overstate
it. Until it has measured anything it admits every stream.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque

from mosaic_core.errors import CapacityError


class IngestCapacity:
    """Frames per second of ingest time, per batch size: the median of its last ``window`` calls' rates, trusted
    once it has ``min_calls`` (thread-safe)."""

    def __init__(self, window: int = 5, min_calls: int = 3) -> None:
        self.window, self.min_calls = window, min_calls
        self._rates_by_batch: dict[int, deque[float]] = {}
        self._lock = threading.Lock()

    def observe(self, num_frames: int, seconds: float) -> None:
        if num_frames <= 0 or seconds <= 0:
            return
        with self._lock:
            rates = self._rates_by_batch.setdefault(num_frames, deque(maxlen=self.window))
            rates.append(num_frames / seconds)

    def frames_per_s(self) -> float | None:
        """The best rate of a batch size measured at least ``min_calls`` times, or None before any."""
        with self._lock:
            trusted = [rates for rates in self._rates_by_batch.values() if len(rates) >= self.min_calls]
            return max((statistics.median(rates) for rates in trusted), default=None)


def check_admission(
    capacity_fps: float | None, *, offered_fps: float, new_fps: float, headroom: float, worker_id: str, stream_id: str
) -> None:
    """Raises ``CapacityError`` (RESOURCE_EXHAUSTED) if ``new_fps`` more would take the worker past
    ``headroom`` of what it ingests. ``headroom`` 0 turns admission off; an unmeasured worker admits."""
    if headroom <= 0 or capacity_fps is None:
        return
    limit = headroom * capacity_fps
    if offered_fps + new_fps > limit:
        raise CapacityError(
            f"worker {worker_id} ingests about {capacity_fps:.1f} frames/s and keeps {headroom:.0%} of that for "
            f"cameras ({limit:.1f} frames/s); its streams already ask for {offered_fps:.1f}, so stream "
            f"{stream_id!r} at {new_fps:g} fps would not be kept real-time. Lower the fps or add workers"
        )
