"""Decode steps read from fixed buffers (what a CUDA graph replays) compute what the eager steps compute.

On the CPU the fixed-buffer step runs eagerly (``capture=False``): the same writes, slot tables and lengths a
replay reads, without the graph. Every step's final hidden state is compared, since the tiny preset's random
weights answer with one token repeated. ``mosaic bench profile`` compares replayed graphs with eager steps on a
GPU.
"""

from __future__ import annotations

import pytest

from mosaic_core.engine.decode_graphs import DecodeGraphs
from tests.unit.engine_helpers import feed, make_engine
from tests.unit.hidden_recorder import assert_same_hiddens, record_hiddens

QUESTIONS = ("What happened on the road?", "When did the cyclist pass the red car?")


def _fixed(engine, model) -> DecodeGraphs:
    graphs = DecodeGraphs(model, engine.tiering.tiers.pools, engine.spec.num_layers, enabled=True, capture=False)
    engine.parts.decode_graphs = graphs
    return graphs


@pytest.mark.parametrize("mode", ["cluster", "token", "full"])
def test_fixed_buffer_steps_compute_the_eager_steps(tiny_model, bikes_frames, mode, monkeypatch):
    engine = make_engine(tiny_model, mode=mode)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:24])
    hiddens = record_hiddens(tiny_model, monkeypatch)
    eager = [engine.answer("cam", q, max_new_tokens=12).token_ids for q in QUESTIONS]
    eager_hiddens = list(hiddens)
    assert engine.parts.decode_graphs.num_steps == 0  # no CUDA: graphs are off by default
    fixed = _fixed(engine, tiny_model)
    hiddens.clear()
    assert [engine.answer("cam", q, max_new_tokens=12).token_ids for q in QUESTIONS] == eager
    assert_same_hiddens(hiddens, eager_hiddens)
    assert fixed.num_steps == sum(len(tokens) - 1 for tokens in eager) > 0


def test_questions_that_measure_recall_or_rescore_decode_eagerly(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, rescore_every_tokens=4)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:16])
    fixed = _fixed(engine, tiny_model)
    engine.answer("cam", QUESTIONS[0], max_new_tokens=8)
    engine.answer("cam", QUESTIONS[0], max_new_tokens=8, measure_recall=True)
    assert fixed.num_steps == 0


def test_graphs_need_cuda(tiny_model, bikes_frames):
    engine = make_engine(tiny_model)
    graphs = DecodeGraphs(tiny_model, engine.tiering.tiers.pools, engine.spec.num_layers, enabled=True)
    assert graphs.enabled == (tiny_model.device.type == "cuda")


def _interleaved(engine, max_new_tokens: int = 12) -> None:
    answers = [engine.ask("cam", q, max_new_tokens=max_new_tokens) for q in QUESTIONS]
    running = [0, 1]
    while running:
        for i in list(running):
            if next(answers[i], None) is None:
                running.remove(i)


def test_interleaved_questions_sharing_one_set_of_buffers_each_compute_their_own(tiny_model, bikes_frames, monkeypatch):
    """Questions of one table width share a graph and its buffers, and the engine loop steps them in turn."""
    engine = make_engine(tiny_model)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:24])
    hiddens = record_hiddens(tiny_model, monkeypatch)
    _interleaved(engine)
    eager_hiddens = list(hiddens)
    fixed = _fixed(engine, tiny_model)
    engine.answer("cam", QUESTIONS[0], max_new_tokens=4)  # the buffers of this width exist from now on
    hiddens.clear()
    _interleaved(engine)
    assert_same_hiddens(hiddens, eager_hiddens)
    assert fixed.num_steps > 4


def test_a_device_pool_grown_mid_answer_retires_the_buffers_built_on_the_old_one(tiny_model, bikes_frames, monkeypatch):
    """Full mode grows its pool when history outgrows it, and ingest goes on while an answer decodes."""
    engine = make_engine(tiny_model, mode="full", device_budget_bytes=1 << 20)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:8])
    reference = make_engine(tiny_model, mode="full", device_budget_bytes=1 << 20)
    reference.open_stream("cam")
    feed(reference, "cam", bikes_frames[:8])
    hiddens = record_hiddens(tiny_model, monkeypatch)
    reference.answer("cam", QUESTIONS[0], max_new_tokens=12)
    expected = list(hiddens)
    fixed = _fixed(engine, tiny_model)
    pools = engine.tiering.tiers.pools
    first_pool = pools.device_pool
    hiddens.clear()
    answer = engine.ask("cam", QUESTIONS[0], max_new_tokens=12)
    for _ in range(3):
        next(answer)
    feed(engine, "cam", bikes_frames[8:40])  # outgrows the pool while the answer decodes
    list(answer)
    assert pools.device_pool is not first_pool
    assert fixed._pool_tensor is pools.device_pool  # a graph would have been captured again on the new pool
    assert_same_hiddens(hiddens, expected)
    assert fixed.num_steps == 11
