"""What ingest, questions and maintenance work with: the engine's parts, handed over without the engine.

``Engine`` builds one ``EngineParts`` and passes it to ``ingest``, ``questions`` and ``maintenance``, which import
this module and never ``engine``: the engine package's imports run one way (engine -> ingest, questions ->
maintenance -> parts), which ``tests/unit/test_layering.py`` checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mosaic_core.bookkeeping.maintenance import CoRetrievalTracker
from mosaic_core.config import EngineConfig
from mosaic_core.engine.history import HistoryKeeper
from mosaic_core.engine.stream import StreamState
from mosaic_core.engine.tiering import TierManager
from mosaic_core.errors import UnknownStreamError
from mosaic_core.memory.layout import KVSpec
from mosaic_core.model.adapter import VlmAdapter


@dataclass(slots=True, kw_only=True)
class EngineParts:
    """The model, the configuration, the tiers and the streams of one engine."""

    model: VlmAdapter
    config: EngineConfig
    spec: KVSpec
    tiering: TierManager
    tracker: CoRetrievalTracker
    history: HistoryKeeper | None
    streams: dict[str, StreamState]  # the engine's own dict: streams it opens appear here
    reserve_window: Callable[[StreamState], None]  # grows a stream's sink + window reservation to its frame size

    def stream(self, stream_id: str) -> StreamState:
        state = self.streams.get(stream_id)
        if state is None:
            raise UnknownStreamError(f"no stream {stream_id!r} is open on this engine")
        return state
