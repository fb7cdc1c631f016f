"""Admission by compute: how many frames per second a worker has been seen to ingest, and whether a new stream
still fits.

Throughput grows with batch size (frames of many streams share a forward pass), so the worker keeps a moving
average per batch size and trusts the best one it has seen. That is conservative: a worker that has only run
small batches underestimates itself, and learns more as streams are added. Until it has measured anything it
admits every stream.
"""

from __future__ import annotations

import threading

from mosaic_core.errors import CapacityError


class IngestCapacity:
    """Frames per second of ingest time, as a moving average per batch size (thread-safe).

    Args:
        smoothing: weight of each new observation in its batch size's average.
    """

    def __init__(self, smoothing: float = 0.2) -> None:
        self.smoothing = smoothing
        self._rate_by_batch: dict[int, float] = {}
        self._lock = threading.Lock()

    def observe(self, num_frames: int, seconds: float) -> None:
        if num_frames <= 0 or seconds <= 0:
            return
        rate = num_frames / seconds
        with self._lock:
            old = self._rate_by_batch.get(num_frames)
            self._rate_by_batch[num_frames] = rate if old is None else old + self.smoothing * (rate - old)

    def frames_per_s(self) -> float | None:
        """The best sustained rate seen, or None before any ingest."""
        with self._lock:
            return max(self._rate_by_batch.values(), default=None)


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
