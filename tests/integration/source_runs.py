"""A pulled source read to its end, unpaced, for tests of what a reader hands over and the state it stops in."""

from __future__ import annotations

import time

from services.sources import SourceProgress, SourceReader, SourceState

READ_TIMEOUT_S = 30.0


def read_to_end(url: str, fps: float) -> tuple[SourceProgress, list[float]]:
    """Reads ``url`` at ``fps`` until the reader stops in ERROR or ENDED, for at most ``READ_TIMEOUT_S``; returns its
    last progress and the stream times of the frames it handed over."""
    received: list[float] = []
    reader = SourceReader(url, fps=fps, sink=lambda t, rgb: received.append(t), realtime=False).start()
    deadline = time.monotonic() + READ_TIMEOUT_S
    while reader.progress().state not in (SourceState.ERROR, SourceState.ENDED) and time.monotonic() < deadline:
        time.sleep(0.05)
    progress = reader.progress()
    reader.stop()
    return progress, received
