"""One camera's state inside the engine: sink, local window, positions, and its clusters' records.

KV of a stream, and where each part lives:

    [ sink (preamble) | clusters c0 c1 c2 ... (any tier) | local window (newest frames) ]
      always device      moved whole between tiers          always device

A new frame's KV enters the local window; when the window overflows, its oldest frames leave it and their KV is
appended to the cluster the formation rules assigned them to on arrival. So a frame's KV is in exactly one place.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

import torch

from mosaic_core.bookkeeping.formation import ClusterFormer, ClusterRecord
from mosaic_core.engine.summaries import SummaryIndex
from mosaic_core.errors import InvalidArgumentError, StreamClosedError, TimestampOrderError
from mosaic_core.model.pixels import VisionGeometry

STREAM_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_stream_id(stream_id: str) -> str:
    if not isinstance(stream_id, str) or not STREAM_ID_PATTERN.match(stream_id):
        raise InvalidArgumentError(
            f"stream id {stream_id!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return stream_id


@dataclass(slots=True)
class LocalFrame:
    frame_index: int
    cluster_id: str
    timestamp_s: float
    kv: torch.Tensor  # [num_layers, 2, num_kv_heads, tokens_per_frame, head_dim], on device


class StreamState:
    """Everything the engine keeps for one stream."""

    def __init__(self, stream_id: str, *, fps: float, former: ClusterFormer, summaries: SummaryIndex) -> None:
        self.stream_id = stream_id
        self.fps = fps
        self.former = former
        self.summaries = summaries
        self.closed = False
        self.sink: torch.Tensor | None = None  # [num_layers, 2, num_kv_heads, sink_tokens, head_dim]
        self.position_base = 0  # first position after the preamble
        self.geometry: VisionGeometry | None = None
        self.first_timestamp_s: float | None = None
        self.last_timestamp_s: float | None = None
        self.text_cursor = 0  # where text after the newest frame starts: this stream's rope delta
        self.frames_ingested = 0
        self.local: deque[LocalFrame] = deque()
        self.local_tokens = 0
        self._past_cache: dict[int, torch.Tensor] = {}
        # Vision-embedding statistics of the open cluster, for visual coherence.
        self.open_embeds: list[torch.Tensor] = []

    # -- checks -------------------------------------------------------------------------------------------------
    def check_open(self) -> None:
        if self.closed:
            raise StreamClosedError(f"stream {self.stream_id!r} is closed and accepts no frames or questions")

    def check_timestamp(self, timestamp_s: float, previous_s: float | None) -> None:
        if previous_s is not None and not timestamp_s > previous_s:
            raise TimestampOrderError(
                f"stream {self.stream_id!r}: frame timestamp {timestamp_s:.3f}s is not after the previous "
                f"frame's {previous_s:.3f}s; timestamps must increase"
            )

    @property
    def sink_tokens(self) -> int:
        return 0 if self.sink is None else self.sink.shape[3]

    # -- local window -------------------------------------------------------------------------------------------
    def push_local(self, frame: LocalFrame) -> None:
        self.local.append(frame)
        self.local_tokens += frame.kv.shape[3]
        self._past_cache.clear()

    def pop_overflow(self, window_tokens: int) -> list[LocalFrame]:
        """Frames that no longer fit in the local window, oldest first."""
        evicted = []
        while self.local and self.local_tokens > window_tokens:
            frame = self.local.popleft()
            self.local_tokens -= frame.kv.shape[3]
            evicted.append(frame)
        if evicted:
            self._past_cache.clear()
        return evicted

    def past_layer(self, layer: int) -> torch.Tensor | None:
        """Sink + local window of one layer, ``[2, num_kv_heads, sink + local tokens, head_dim]``.

        Every new frame and every question attends to exactly this; it is built once per layer and kept until
        the window changes, so the frames of one pass and all layers of a question share the concatenation.
        """
        if layer not in self._past_cache:
            pieces = [] if self.sink is None else [self.sink[layer]]
            pieces += [f.kv[layer] for f in self.local]
            if not pieces:
                return None
            self._past_cache[layer] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
        return self._past_cache[layer]

    def local_cluster_ids(self) -> set[str]:
        return {f.cluster_id for f in self.local}

    # -- clusters -----------------------------------------------------------------------------------------------
    def records(self) -> dict[str, ClusterRecord]:
        return {r.cluster_id: r for r in self.former.records()}
