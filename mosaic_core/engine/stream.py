"""One camera's state inside the engine: sink, local window, positions, and its clusters' records.

KV of a stream, and where each part lives:

    [ sink (preamble) | clusters c0 c1 c2 ... (any tier) | local window (newest frames) ]
      device pages       pages, moved whole between tiers    device pages

A new frame's KV is written once, into device pages of the arena, and enters the local window; when the window
overflows, its oldest frames leave it and their pages are handed to the cluster the formation rules assigned them
to on arrival (without a copy when that cluster is on the device). So a frame's KV is in exactly one place.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from mosaic_core.bookkeeping.cluster_record import ClusterRecord
from mosaic_core.bookkeeping.formation import ClusterFormer
from mosaic_core.engine.coherence import OpenSums
from mosaic_core.errors import InvalidArgumentError, StreamClosedError, TimestampOrderError, shown
from mosaic_core.memory.arena import PagePools
from mosaic_core.model.geometry import VisionGeometry

STREAM_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # the whole id (fullmatch): "$" lets "\n" end it


def check_stream_id(stream_id: str) -> str:
    if not isinstance(stream_id, str) or not STREAM_ID_PATTERN.fullmatch(stream_id):
        raise InvalidArgumentError(
            f"stream id {shown(stream_id)} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return stream_id


@dataclass(slots=True)
class LocalFrame:
    frame_index: int
    cluster_id: str
    timestamp_s: float
    pages: list[int]  # device pages holding the frame's KV, token order
    fills: list[int]  # tokens in each page
    slots: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))  # PagePools.slots of them

    @property
    def num_tokens(self) -> int:
        return sum(self.fills)


class StreamState:
    """Everything the engine keeps for one stream."""

    def __init__(
        self, stream_id: str, *, fps: float, former: ClusterFormer, pools: PagePools, first_frame_index: int = 0
    ) -> None:
        self.stream_id = stream_id
        self.fps = fps
        self.former = former
        self.closed = False
        self.pools = pools
        self.sink_pages: list[int] = []
        self.sink_fills: list[int] = []
        self.position_base = 0  # first position after the preamble
        self.geometry: VisionGeometry | None = None
        self.first_timestamp_s: float | None = None
        self.last_timestamp_s: float | None = None
        self.text_cursor = 0  # where text after the newest frame starts: this stream's rope delta
        # Frames are numbered on from ``first_frame_index`` (past those of an ended stream of the same id, whose
        # keyframe ids name them), and after a restart past every index the stream may have handed out
        # (``HistoryKeeper.ensure_ids``), so the numbering may skip; ``frames_ingested`` counts this stream's own.
        self.first_frame_index = first_frame_index
        self.next_frame_index = first_frame_index
        self.frames_ingested = 0
        self.local: deque[LocalFrame] = deque()
        self.local_tokens = 0
        self.reserved_bytes = 0  # device bytes reserved for sink + window
        self._past_slots: np.ndarray | None = None
        self.open_sums: OpenSums | None = None  # the open cluster, for visual coherence

    # -- checks -------------------------------------------------------------------------------------------------
    def check_open(self) -> None:
        if self.closed:
            raise StreamClosedError(f"stream {self.stream_id!r} is closed and accepts no frames or questions")

    def check_timestamp(self, timestamp_s: float, previous_s: float | None) -> None:
        if not math.isfinite(timestamp_s):
            raise InvalidArgumentError(
                f"stream {self.stream_id!r}: a frame's timestamp must be finite, not {timestamp_s}"
            )
        if previous_s is not None and not timestamp_s > previous_s:
            raise TimestampOrderError(
                f"stream {self.stream_id!r}: frame timestamp {timestamp_s:.3f}s is not after the previous "
                f"frame's {previous_s:.3f}s; timestamps must increase"
            )

    @property
    def sink_tokens(self) -> int:
        return sum(self.sink_fills)

    def set_sink(self, pages: list[int], fills: list[int]) -> None:
        self.sink_pages, self.sink_fills = pages, fills
        self._past_slots = None

    # -- local window -------------------------------------------------------------------------------------------
    def push_local(self, frame: LocalFrame) -> None:
        self.local.append(frame)
        self.local_tokens += frame.num_tokens
        self._past_slots = None

    def pop_overflow(self, window_tokens: int) -> list[LocalFrame]:
        """Frames that no longer fit in the local window, oldest first. A window of 0 tokens gives up every frame
        (a checkpoint); any other keeps at least the newest frame, even one larger than the window, so a cluster's
        last frame leaves only once the frame that sealed the cluster came, which is when the cluster completes
        (``ClusterRecord.completed_by``) and is written, joined and copied."""
        evicted = []
        keep = 1 if window_tokens else 0
        while len(self.local) > keep and self.local_tokens > window_tokens:
            frame = self.local.popleft()
            self.local_tokens -= frame.num_tokens
            evicted.append(frame)
        if evicted:
            self._past_slots = None
        return evicted

    def return_to_window(self, frames: list[LocalFrame]) -> None:
        """Puts frames ``pop_overflow`` gave up (oldest first) back at the front of the window: their clusters had
        no room for them."""
        self.local.extendleft(reversed(frames))
        self.local_tokens += sum(frame.num_tokens for frame in frames)
        self._past_slots = None

    def past_pages(self) -> list[int]:
        """Device pages of sink + local window."""
        return self.sink_pages + [p for f in self.local for p in f.pages]

    def past_slots(self) -> np.ndarray:
        """Slots of sink + local window in the device pool, in order: what every new frame and every question
        attends to. Kept until the window changes (an index, not a copy of the KV)."""
        if self._past_slots is None:
            sink = self.pools.slots(self.sink_pages, self.sink_fills)
            self._past_slots = np.concatenate([sink, *(f.slots for f in self.local)])
        return self._past_slots

    def past_layer(self, layer: int) -> torch.Tensor | None:
        """Sink + local window of one layer, ``[2, num_kv_heads, sink + local tokens, head_dim]``, as a new tensor
        read out of the pages (for measurements and standing questions; attention reads the pages in place)."""
        slots = self.past_slots()
        return self.pools.read_slots(layer, slots) if len(slots) else None

    def local_cluster_ids(self) -> set[str]:
        return {f.cluster_id for f in self.local}

    # -- clusters -----------------------------------------------------------------------------------------------
    def records(self) -> dict[str, ClusterRecord]:
        """The stream's cluster records themselves (not copies), by id, for a caller that only reads them."""
        return {r.cluster_id: r for r in self.former.records_to_read()}
