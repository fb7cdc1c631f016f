"""Server-side ingest from a file, URL or ``rtsp://`` source: sample at the stream's fps, pace, reconnect.

Which sources are allowed is checked at CreateStream (``services.source_policy``). FFmpeg itself opens only the
protocols the source's own scheme needs (``mosaic_core.model.video_sources.protocol_whitelist``), so a redirect
cannot reach another protocol. A URL's host may not be in a blocked network (``services.source_hosts``: loopback,
with this machine's own addresses, and link-local by default), as written at CreateStream and as resolved before
every connect.

One ``SourceReader`` thread per stream decodes with PyAV (``mosaic_core.model.video.iter_video_frames``), or,
with ``decode_in_child``, reads what a child process decodes (``services.source_decoding``), and hands each sampled
frame to a callback (the worker's bounded, drop-oldest ingest queue). Frames are
paced to real time: sample ``k`` is released at ``start + k / fps`` wall-clock seconds, so a file behaves
like a live camera and never floods the queue. ``loop`` restarts a file or URL at its end (demo cameras).

Failures: network sources (rtsp, http) reconnect with exponential backoff (``backoff_s`` doubling up to
``max_backoff_s``). Timestamps keep increasing: a network source's clock resumes at the wall-clock time since its
first frame (never before its last frame), as a restart's does (``services.worker_streams``), so a camera stays in
step with the wall clock across an outage (a paced file served over HTTP, looped by reconnecting, is where it
would have been anyway). After ``max_failures`` attempts in a row that read no frame, an http(s) source stops in
``SourceState.ERROR`` with the last error, and at the first where the server refuses what the source serves (a
playlist or another container outside ``SOURCE_FORMATS``: trying again cannot help); a live camera (rtsp, rtmp,
udp, tcp) keeps trying every ``max_backoff_s``, since a camera that reboots or loses its network comes back, and a
service that runs for months must not need a restart to read it again. From
a failed attempt on, the state is ERROR with the last error, through the retries, until a frame is read (RUNNING):
a dead camera does not flap between ERROR and CONNECTING. After ``max_refused_frames`` frames in a row that the sink
refused, any source stops in ERROR. A local file that cannot be opened or decoded ends in ERROR at once. The
first failure is logged as one line; repeats are logged at most once per ``LOG_EVERY_S`` with a count, never with a
traceback for an expected error.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mosaic_core.errors import ConfigError, MosaicError, RefusedSourceError
from mosaic_core.model.video import iter_video_frames
from services.source_decoding import iter_frames_in_child
from services.source_hosts import Network, resolved_refusal
from services.source_policy import DEFAULT_BLOCKED
from services.url_text import without_credentials

log = logging.getLogger(__name__)
LIVE_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "udp://", "tcp://")
# A live source's frame this far ahead of its pace is not waited for: the pace starts again from it (a camera's
# timestamps jumped forward, and waiting would leave its socket unread while it reports RUNNING).
LIVE_JUMP_S = 2.0
NETWORK_SCHEMES = (*LIVE_SCHEMES, "http://", "https://")
DEFAULT_MAX_FAILURES = 10
DEFAULT_MAX_REFUSED_FRAMES = 100
LOG_EVERY_S = 60.0


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
        max_failures: attempts in a row that read no frame before the reader gives up in ERROR (a live camera:
            before it says so and tries every ``max_backoff_s`` from then on).
        max_refused_frames: frames in a row the sink refused before the reader gives up in ERROR.
        decode_in_child: decode in a child process (``services.source_decoding``), not in this thread.
        max_pixels: frames with more pixels are scaled down to at most this many as they are decoded, aspect ratio
            kept (``iter_video_frames``); None keeps the source's size.
        blocked_networks: before every connect to a network source, its host's addresses are resolved, and one in
            these networks stops the reader in ERROR (``services.source_hosts.resolved_refusal``).
        resume_after_s: the first read yields only the frames after this time of the source's own clock (a restart's
            position in a file: ``iter_video_frames``), paced from there; None starts at the first frame.
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
        max_failures: int = DEFAULT_MAX_FAILURES,
        max_refused_frames: int = DEFAULT_MAX_REFUSED_FRAMES,
        name: str = "source",
        decode_in_child: bool = False,
        max_pixels: int | None = None,
        blocked_networks: tuple[Network, ...] = DEFAULT_BLOCKED,
        resume_after_s: float | None = None,
    ) -> None:
        if max_failures < 1 or max_refused_frames < 1:
            raise ConfigError(f"max_failures={max_failures} and max_refused_frames={max_refused_frames} must be >= 1")
        self.url = url
        self.shown_url = without_credentials(url)  # for logs and errors
        self.fps = fps
        self.sink = sink
        self.loop = loop
        self.realtime = realtime
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_failures = max_failures
        self.max_refused_frames = max_refused_frames
        self.decode_in_child = decode_in_child
        self.max_pixels = max_pixels
        self.blocked_networks = blocked_networks
        self._resume_after_s = resume_after_s  # for the first read only
        self._num_refused = 0  # frames in a row the sink refused
        self._clock_epoch_unix: float | None = None  # wall-clock time at which this reader's clock read 0
        self._logged: dict[str, float] = {}  # what -> monotonic time it was last logged
        self._num_unlogged: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._progress = SourceProgress(SourceState.CONNECTING, 0, None, 0, "")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @classmethod
    def never_started(cls, url: str, state: SourceState, *, fps: float, sink: FrameSink, error: str = ""):
        """A reader that never starts, in ``state``: ERROR with ``error`` for a stored source this server no longer
        opens; ENDED for a stored file or clip read to its end before a restart."""
        reader = cls(url, fps=fps, sink=sink)
        reader._set(state=state, error=error)
        return reader

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

    def request_stop(self) -> None:
        """Asks the reader to stop without waiting for it (``stop`` waits); stopping many, ask them all first."""
        self._stop.set()

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
        num_failures = 0
        while not self._stop.is_set():
            if num_failures == 0:  # after a failure the state stays ERROR, with its reason, until a frame arrives
                self._set(state=SourceState.CONNECTING)
            frames_before = self.progress().frames_read
            host_refusal = resolved_refusal(self.url, self.blocked_networks) if self.is_network else None
            if host_refusal is not None:
                return self._give_up(host_refusal)
            try:
                ended = self._read_once()
            except _SinkRefused as err:
                return self._give_up(f"{self.max_refused_frames} frames in a row were refused: {err.reason}")
            except Exception as err:  # any failure ends in ERROR, never in a dead thread
                reason = str(err) if isinstance(err, MosaicError) else f"{type(err).__name__}: {err}"
                for quoted in (self.url, repr(self.url)[1:-1]):  # errors may quote the URL, or its repr
                    reason = reason.replace(quoted, self.shown_url)
                self._set(state=SourceState.ERROR, error=reason)
                if self.progress().frames_read > frames_before:  # the connection worked: back off from the start
                    num_failures, delay_s = 0, self.backoff_s
                num_failures += 1
                if not self.is_network or isinstance(err, RefusedSourceError):
                    return self._give_up(reason)
                if num_failures >= self.max_failures and not self.is_live:
                    return self._give_up(f"{num_failures} attempts in a row failed; the last: {reason}")
                if num_failures >= self.max_failures:
                    every = f"trying again every {self.max_backoff_s:g} s"
                    self._set(error=f"{num_failures} attempts in a row failed, {every}; the last: {reason}")
                    delay_s = self.max_backoff_s
                self._log_limited(
                    "failure", "source %s failed (attempt %d of %d): %s", num_failures, self.max_failures, reason
                )
            else:
                num_failures = 0
                if ended and not (self.is_live or (self.is_network and self.loop)):
                    self._set(state=SourceState.ENDED)
                    return
                delay_s = self.backoff_s
            with self._lock:
                self._progress.num_reconnects += 1
            if self._stop.wait(delay_s):
                return
            delay_s = min(self.max_backoff_s, delay_s * 2)

    def _give_up(self, reason: str) -> None:
        self._set(state=SourceState.ERROR, error=reason)
        log.warning("source %s stopped in ERROR: %s", self.shown_url, reason)

    def _log_limited(self, what: str, message: str, *args) -> None:
        """Logs ``message`` the first time and then at most once per ``LOG_EVERY_S``, with a repeat count."""
        now = time.monotonic()
        last = self._logged.get(what)
        if last is not None and now - last < LOG_EVERY_S:
            self._num_unlogged[what] = self._num_unlogged.get(what, 0) + 1
            return
        repeats = self._num_unlogged.pop(what, 0)
        suffix = f" ({repeats} more like it since the last report)" if repeats else ""
        self._logged[what] = now
        log.warning(message + "%s", self.shown_url, *args, suffix)

    def _read_once(self) -> bool:
        """Reads until the source ends (True) or the reader is stopped (False)."""
        last = self.progress().last_timestamp_s
        # Continue the stream clock after a reconnect so timestamps keep increasing. A network source's resumes at the
        # wall clock's time, as a restart's does: from its last frame it would run the outage's length behind the wall.
        offset_s = 0.0 if last is None else last + 1.0 / self.fps
        if self.is_network and self._clock_epoch_unix is not None:
            offset_s = max(offset_s, time.time() - self._clock_epoch_unix)
        loop = self.loop and not self.is_network
        sampling = {"fps": self.fps, "loop": loop, "start_offset_s": offset_s, "max_pixels": self.max_pixels}
        resume_after_s, self._resume_after_s = self._resume_after_s, None
        paced_from_s = offset_s  # the time the pace starts at: a resumed read's first frame comes right after it
        if resume_after_s is not None:
            sampling["resume_after_s"] = resume_after_s
            paced_from_s += resume_after_s
        if self.decode_in_child:
            frames = iter_frames_in_child(self.url, **sampling, stop=self._stop)
        else:
            frames = iter_video_frames(self.url, **sampling)
        wall_start = time.monotonic()
        # A resumed read's pace starts at its first frame: the decoding up to its position (a whole file's, in a
        # container without an index) would otherwise be made up for by a burst that overflows the ingest queue.
        pace_at_first = resume_after_s is not None
        with contextlib.closing(frames):  # a child process goes with its iterator
            for frame in frames:
                if self._stop.is_set():
                    return False
                if self.realtime:
                    if pace_at_first:
                        wall_start, pace_at_first = time.monotonic(), False
                    wait_s = wall_start + (frame.timestamp_s - paced_from_s) - time.monotonic()
                    if self.is_live and wait_s > LIVE_JUMP_S:  # a camera's clock jumped: it still sends in real time
                        wall_start -= wait_s
                        wait_s = 0.0
                    if wait_s > 0 and self._stop.wait(wait_s):
                        return False
                if self._clock_epoch_unix is None:
                    self._clock_epoch_unix = time.time() - frame.timestamp_s
                with self._lock:
                    self._progress.state = SourceState.RUNNING
                    self._progress.frames_read += 1
                    self._progress.last_timestamp_s = frame.timestamp_s
                    self._progress.error = ""
                self._offer(frame.timestamp_s, frame.rgb)
        return not self._stop.is_set()  # a child's frames end early once the reader is stopped

    def _offer(self, timestamp_s: float, rgb: np.ndarray) -> None:
        try:
            self.sink(timestamp_s, rgb)
        except Exception as err:  # a refusal must not end the thread silently
            self._num_refused += 1
            reason = str(err) if isinstance(err, MosaicError) else f"{type(err).__name__}: {err}"
            self._set(error=f"frame at {timestamp_s:.3f}s refused: {reason}")
            if not isinstance(err, MosaicError) and self._num_refused == 1:
                log.error("source %s: unexpected error from the sink", self.shown_url, exc_info=err)
            self._log_limited("refused", "source %s: frame at %.3fs refused: %s", timestamp_s, reason)
            if self._num_refused >= self.max_refused_frames:
                raise _SinkRefused(reason) from None
        else:
            self._num_refused = 0


class _SinkRefused(Exception):
    """The sink refused ``max_refused_frames`` frames in a row."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
