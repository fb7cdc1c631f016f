"""What ingest, questions and maintenance work with: the engine's parts, handed over without the engine.

It holds no reference back to the ``Engine``: a cycle would keep a deleted engine, and its device page pool,
alive until the garbage collector ran.

``Engine`` builds one ``EngineParts`` and passes it to ``ingest``, ``questions`` and ``maintenance``, which import
this module and never ``engine``: the engine package's imports run one way (engine -> ingest, questions ->
maintenance -> parts), which ``tests/unit/test_layering.py`` checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mosaic_core.bookkeeping.maintenance import CoRetrievalTracker
from mosaic_core.bookkeeping.pages import pages_for
from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.config import EngineConfig
from mosaic_core.engine.decode_graphs import DecodeGraphs
from mosaic_core.engine.history import HistoryKeeper
from mosaic_core.engine.keyframe_store import KeyframeSettings
from mosaic_core.engine.prefill_graphs import PrefillGraphs
from mosaic_core.engine.stream import StreamState
from mosaic_core.engine.tiering import TierManager
from mosaic_core.errors import BudgetError, UnknownStreamError
from mosaic_core.memory.layout import KVSpec
from mosaic_core.model.adapter import VlmAdapter
from mosaic_core.model.frame_upload import FrameStaging


@dataclass(slots=True, kw_only=True)
class EngineParts:
    """The model, the configuration, the tiers and the streams of one engine."""

    model: VlmAdapter
    config: EngineConfig
    spec: KVSpec
    tiering: TierManager
    tracker: CoRetrievalTracker
    history: HistoryKeeper | None
    keyframes: KeyframeSettings
    streams: dict[str, StreamState]  # the engine's own dict: streams it opens appear here
    decode_graphs: DecodeGraphs
    prefill_graphs: PrefillGraphs
    frame_staging: FrameStaging  # ingest's frames reach the device through it
    question_stream: torch.cuda.Stream | None  # high priority, for questions started inside an ingest call (CUDA)
    tower_stream: torch.cuda.Stream | None  # ingest's uploads and vision tower, with ``config.tower_stream`` (CUDA)

    def stream(self, stream_id: str) -> StreamState:
        state = self.streams.get(stream_id)
        if state is None:
            raise UnknownStreamError(f"no stream {stream_id!r} is open on this engine")
        return state

    def reserve_window(self, state: StreamState, *, sink_pages: int | None = None) -> None:
        """Reserves the device pages of a stream's sink and local window (grown once its frame size is known).

        Between a pass and the eviction after it, the window holds up to one pass of frames more than its size,
        and a frame takes whole pages of its own.
        """
        page_tokens = self.tiering.tiers.pools.page_tokens
        # Until the first frame shows its size, assume the size pages are made for.
        tokens_per_frame = page_tokens if state.geometry is None else state.geometry.tokens_per_frame
        frames = -(-self.config.local_window_tokens // tokens_per_frame) + self.config.max_frames_per_pass + 1
        sink_pages = len(state.sink_fills) if sink_pages is None else sink_pages
        pages = sink_pages + frames * len(pages_for(tokens_per_frame, page_tokens))
        num_bytes = pages * self.tiering.tiers.pools.page_bytes
        if num_bytes <= state.reserved_bytes:
            return
        owner, residency = f"{state.stream_id}:sink+window", self.tiering.residency
        extra = num_bytes - state.reserved_bytes
        plan = residency.plan_make_room(Tier.DEVICE, extra)
        if plan is None:
            raise BudgetError(
                f"device budget cannot hold stream {state.stream_id!r}'s sink + local window ({pages} pages, "
                f"{num_bytes} bytes; {residency.free_bytes(Tier.DEVICE)} bytes can be freed)"
            )
        self.tiering.execute(plan)
        if state.reserved_bytes:
            residency.release(owner)
        residency.reserve(owner, num_bytes)
        state.reserved_bytes = num_bytes
