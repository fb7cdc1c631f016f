"""Pushed frames sampled to their stream's fps: the grid rule, and the router's guess of it that spares a decode.

**The rule** (a worker's ``IngestQueues.put``). A stream's pushed frames fall on a grid of ``1/fps`` slots anchored at
its first frame ``t0``: frame ``t`` has slot ``floor((t - t0) * fps + GRID_EPS)``, and it is kept only when its slot
is after the last kept frame's; otherwise it is *sampled out* (``PushFramesResponse.frames_sampled_out``; no metric
counts it). A frame whose timestamp is not after the stream's previous frame, kept or sampled out, is refused
instead. The stream's first frame is always kept.

**The guess** (``PushSampling``). Each reply of a worker to pushed frames carries the grid of their streams as the
worker left it (``SamplingGrid``). Before decoding a frame, the router looks at the last grid it heard for the
frame's stream: a frame after the grid's last timestamp, in the last kept frame's slot, would be sampled out if
nothing else reached the worker meanwhile. Such a frame is sent to the worker *without its pixels*
(``FrameIntake.push``), and the worker decides as it would for the whole frame, with the same checks in the same
order (stream, push clock, timestamp order, slot): a frame it would sample out is counted there, and advances the
stream's last timestamp, as the decoded frame would have; a frame it would keep changes nothing there and is
returned (``PushResult.needs_pixels``), and the router decodes it and pushes it whole. So a wrong guess costs one more
call to the worker, never a different count: the worker alone says what is sampled out.

A guess from a grid gone out of date by frames of another call or another router is still right, since a grid only
moves forward (a later last timestamp, a later last slot): the frame is sampled out, or refused as out of order. A
guess goes wrong only where the grid started again: a worker restarted, a stream deleted and created again.

::

    fps = 2, t0 = 10.0       slot:   0       1       2
    grid                     |-------|-------|-------|
    pushed at 10 fps         k s s s s k s s s s k          k kept (decoded), s sampled out (not decoded)

What is not decoded is not checked past its header: a frame whose header reads well (``frames.check_header``) but
whose picture is broken, pushed into a slot already taken, is counted sampled out rather than refused, and its
timestamp is its stream's last, where a decoded one would have been refused before reaching the worker.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

# A frame up to this share of a frame interval early still takes its slot: Unix timestamps carry float error (about
# 1e-7 s in ``t - t0``) and cameras jitter; a smaller margin sampled out a third of a 3-fps camera pushed at 3 fps.
GRID_EPS = 0.05


def grid_slot(timestamp_s: float, first_timestamp_s: float, fps: float) -> int:
    """The slot of a frame at ``timestamp_s`` on the grid of a stream whose first frame was at ``first_timestamp_s``."""
    return math.floor((timestamp_s - first_timestamp_s) * fps + GRID_EPS)


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingGrid:
    """A stream's sampling grid as its worker last left it: its fps, first frame, last kept slot and last timestamp
    (kept or sampled out)."""

    fps: float
    first_timestamp_s: float
    last_slot: int
    last_timestamp_s: float

    def samples_out(self, timestamp_s: float) -> bool:
        """Whether the stream's next pushed frame, at ``timestamp_s``, falls in the slot already taken: after the
        last timestamp (an earlier one is refused, not sampled out) and in no later slot than the last kept."""
        return timestamp_s > self.last_timestamp_s and (
            grid_slot(timestamp_s, self.first_timestamp_s, self.fps) <= self.last_slot
        )


class PushSampling:
    """The router's last word from each stream's worker on its grid, to guess which pushed frames need no decoding."""

    def __init__(self) -> None:
        self._grids: dict[str, SamplingGrid] = {}

    @property
    def num_streams(self) -> int:
        return len(self._grids)

    def skips(self, stream_id: str, timestamp_s: float) -> bool:
        """Whether to send the frame without its pixels: its stream's last heard grid samples it out (module doc).
        A stream not heard of yet is never skipped."""
        grid = self._grids.get(stream_id)
        return grid is not None and grid.samples_out(timestamp_s)

    def learn(self, grids: dict[str, SamplingGrid]) -> None:
        """Takes the grids a worker's reply carries, each the newest word on its stream."""
        self._grids.update(grids)

    def keep_only(self, stream_ids: Collection[str]) -> None:
        """Forgets the streams not in ``stream_ids`` (deleted ones)."""
        self._grids = {s: grid for s, grid in self._grids.items() if s in stream_ids}
