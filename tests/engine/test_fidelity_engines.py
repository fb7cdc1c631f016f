"""``run_fidelity`` builds one engine per (budget, mode): each is closed and gone before the next is built, so two
engines' device pools and pinned host chunks are never held at once."""

from __future__ import annotations

import weakref

from mosaic_core import fidelity
from mosaic_core.engine.engine import Engine
from mosaic_core.engine.results import FrameInput
from tests.engine.engine_helpers import SMALL


def test_each_engine_is_gone_before_the_next_is_built(tiny_model, bikes_frames, monkeypatch):
    made: list[weakref.ref] = []

    def engine(model, config) -> Engine:
        alive = [ref for ref in made if ref() is not None]
        assert not alive, f"{len(alive)} engine(s) of earlier rows still held as the next is built"
        built = Engine(model, config)
        made.append(weakref.ref(built))
        return built

    monkeypatch.setattr(fidelity, "Engine", engine)
    frames = [FrameInput("fidelity", t, rgb) for t, rgb in bikes_frames[:12]]
    rows = fidelity.run_fidelity(tiny_model, frames, base=SMALL, budgets=[96], questions=["What happened?"])
    assert len(rows) == len(made) == len(fidelity.RetrievalMode)
    assert all(ref() is None for ref in made), "the last engine is gone once the table is made"
