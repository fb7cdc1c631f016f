"""Decode steps read from fixed buffers (what a CUDA graph replays) give the tokens the eager steps give.

On the CPU the fixed-buffer step runs eagerly (``capture=False``): the same writes, slot tables and lengths a
replay reads, without the graph. ``mosaic bench profile`` compares replayed graphs with eager steps on a GPU.
"""

from __future__ import annotations

import pytest

from mosaic_core.engine.decode_graphs import DecodeGraphs
from tests.unit.engine_helpers import feed, make_engine

QUESTIONS = ("What happened on the road?", "When did the cyclist pass?")


def _answers(engine, max_new_tokens: int = 12) -> list[list[int]]:
    return [engine.answer("cam", q, max_new_tokens=max_new_tokens).token_ids for q in QUESTIONS]


@pytest.mark.parametrize("mode", ["cluster", "token", "full"])
def test_fixed_buffer_steps_give_the_eager_tokens(tiny_model, bikes_frames, mode):
    engine = make_engine(tiny_model, mode=mode)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:24])
    eager = _answers(engine)
    assert engine.parts.decode_graphs.num_steps == 0  # no CUDA: graphs are off by default
    fixed = DecodeGraphs(tiny_model, engine.tiering.tiers.pools, engine.spec.num_layers, enabled=True, capture=False)
    engine.parts.decode_graphs = fixed
    assert _answers(engine) == eager
    assert fixed.num_steps == sum(len(tokens) - 1 for tokens in eager) > 0


def test_questions_that_measure_recall_or_rescore_decode_eagerly(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, rescore_every_tokens=4)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:16])
    fixed = DecodeGraphs(tiny_model, engine.tiering.tiers.pools, engine.spec.num_layers, enabled=True, capture=False)
    engine.parts.decode_graphs = fixed
    engine.answer("cam", QUESTIONS[0], max_new_tokens=8)
    engine.answer("cam", QUESTIONS[0], max_new_tokens=8, measure_recall=True)
    assert fixed.num_steps == 0


def test_graphs_need_cuda(tiny_model, bikes_frames):
    engine = make_engine(tiny_model)
    graphs = DecodeGraphs(tiny_model, engine.tiering.tiers.pools, engine.spec.num_layers, enabled=True)
    assert graphs.enabled == (tiny_model.device.type == "cuda")
