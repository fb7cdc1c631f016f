"""Server-side ingest from a file, URL or ``rtsp://`` source: sample at the stream's fps, pace, reconnect.

One ``SourceReader`` thread per stream decodes with PyAV (``mosaic_core.model.video.iter_video_frames``)
and hands each sampled frame to a callback (the worker's bounded, drop-oldest ingest queue). Frames are
paced to real time: sample ``k`` is released at ``start + k / fps`` wall-clock seconds, so a file behaves
like a live camera and never floods the queue. ``loop`` restarts a file or URL at its end (demo cameras).

Failures: network sources (rtsp, http) reconnect with exponential backoff (``backoff_s`` doubling up to
``max_backoff_s``); the stream clock continues where it stopped, so timestamps keep increasing. A local
file that cannot be opened or decoded ends in ``SourceState.ERROR`` with the reason.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mosaic_core.errors import MosaicError
from mosaic_core.model.video import iter_video_frames

log = logging.getLogger(__name__)
LIVE_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "udp://", "tcp://")
NETWORK_SCHEMES = (*LIVE_SCHEMES, "http://", "https://")


class SourceState(enum.IntEnum):
    """Mirrors ``mosaic.v1.SourceState`` (same numbers)."""

    PUSH = 1
    CONNECTING = 2
    RUNNING = 3
    ENDED = 4
    ERROR = 5


@dataclass(slots=True)
class SourceProgress:
    """What a reader has done so far."""

    state: SourceState
    frames_read: int
    last_timestamp_s: float | None
    num_reconnects: int
    error: str


FrameSink = Callable[[float, np.ndarray], None]


class SourceReader:
    """Pulls one source in a daemon thread and calls ``sink(timestamp_s, rgb)`` for each sampled frame.

    Args:
        url: file path or URL that FFmpeg can open.
        fps: sampling rate.
        sink: receives each frame; exceptions from it are logged and the frame is skipped.
        loop: restart the source at its end (files and URLs).
        realtime: pace frames to wall-clock time (False reads as fast as decoding allows).
        backoff_s: first reconnect delay; doubles up to ``max_backoff_s``.
    """

    def __init__(
        self,
        url: str,
        *,
        fps: float,
        sink: FrameSink,
        loop: bool = False,
        realtime: bool = True,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        name: str = "source",
    ) -> None:
        self.url = url
        self.fps = fps
        self.sink = sink
        self.loop = loop
        self.realtime = realtime
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._progress = SourceProgress(SourceState.CONNECTING, 0, None, 0, "")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def is_network(self) -> bool:
        return self.url.lower().startswith(NETWORK_SCHEMES)

    @property
    def is_live(self) -> bool:
        """A camera feed: its end is a disconnect, so the reader reconnects."""
        return self.url.lower().startswith(LIVE_SCHEMES)

    def start(self) -> SourceReader:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def progress(self) -> SourceProgress:
        with self._lock:
            p = self._progress
            return SourceProgress(p.state, p.frames_read, p.last_timestamp_s, p.num_reconnects, p.error)

    def _set(self, **changes) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(self._progress, key, value)

    def _run(self) -> None:
        delay_s = self.backoff_s
        while not self._stop.is_set():
            self._set(state=SourceState.CONNECTING)
            try:
                ended = self._read_once()
            except MosaicError as err:
                self._set(state=SourceState.ERROR, error=str(err))
                log.warning("source %s failed: %s", self.url, err)
                if not self.is_network:
                    return
            else:
                if ended and not (self.is_live or (self.is_network and self.loop)):
                    self._set(state=SourceState.ENDED)
                    return
                delay_s = self.backoff_s
            with self._lock:
                self._progress.num_reconnects += 1
            if self._stop.wait(delay_s):
                return
            delay_s = min(self.max_backoff_s, delay_s * 2)

    def _read_once(self) -> bool:
        """Reads until the source ends (True) or the reader is stopped (False)."""
        last = self.progress().last_timestamp_s
        # Continue the stream clock after a reconnect so timestamps keep increasing.
        offset_s = 0.0 if last is None else last + 1.0 / self.fps
        frames = iter_video_frames(
            self.url, fps=self.fps, loop=self.loop and not self.is_network, start_offset_s=offset_s
        )
        wall_start = time.monotonic()
        for frame in frames:
            if self._stop.is_set():
                return False
            if self.realtime:
                wait_s = wall_start + (frame.timestamp_s - offset_s) - time.monotonic()
                if wait_s > 0 and self._stop.wait(wait_s):
                    return False
            with self._lock:
                self._progress.state = SourceState.RUNNING
                self._progress.frames_read += 1
                self._progress.last_timestamp_s = frame.timestamp_s
                self._progress.error = ""
            try:
                self.sink(frame.timestamp_s, frame.rgb)
            except Exception:
                log.exception("source %s: frame at %.3fs was not accepted", self.url, frame.timestamp_s)
        return True
