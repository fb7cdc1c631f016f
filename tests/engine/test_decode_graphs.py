"""Decode steps read from fixed buffers (what a CUDA graph replays) compute what the eager steps compute.

On the CPU the fixed-buffer step runs eagerly (``capture=False``): the same writes, slot tables and lengths a
replay reads, without the graph. Every step's final hidden state is compared, since the tiny preset's random
weights answer with one token repeated. ``mosaic bench profile`` compares replayed graphs with eager steps on a
GPU.
"""

from __future__ import annotations

import pytest

from mosaic_core.engine.decode_graphs import DecodeGraphs
from tests.engine.engine_helpers import feed, make_engine
from tests.engine.hidden_recorder import assert_same_hiddens, record_hiddens, rows_of

QUESTIONS = ("What happened on the road?", "When did the cyclist pass the red car?")


def _eager_engine(model, **overrides):
    """An engine whose questions run eagerly on CUDA too, as on the CPU: there graphs are on by default, and their
    captures' warm-ups run the model as well, which records hidden states the eager answers never computed."""
    return make_engine(model, prefill_graphs=False, decode_graphs=False, **overrides)


def _camera(model, frames, **overrides):
    """An eager engine (``_eager_engine``) with one stream, "cam", fed ``frames``."""
    engine = _eager_engine(model, **overrides)
    engine.open_stream("cam")
    feed(engine, "cam", frames)
    return engine


def _fixed(engine, model) -> DecodeGraphs:
    graphs = DecodeGraphs(model, engine.tiering.tiers.pools, engine.spec.num_layers, enabled=True, capture=False)
    engine.parts.decode_graphs = graphs
    return graphs


@pytest.mark.parametrize("mode", ["cluster", "token", "full"])
def test_fixed_buffer_steps_compute_the_eager_steps(tiny_model, bikes_frames, mode, monkeypatch):
    engine = _camera(tiny_model, bikes_frames[:24], mode=mode)
    hiddens = record_hiddens(tiny_model, monkeypatch)
    eager = [engine.answer("cam", q, max_new_tokens=12).token_ids for q in QUESTIONS]
    eager_hiddens = list(hiddens)
    assert engine.parts.decode_graphs.num_steps == 0  # graphs off
    fixed = _fixed(engine, tiny_model)
    hiddens.clear()
    assert [engine.answer("cam", q, max_new_tokens=12).token_ids for q in QUESTIONS] == eager
    assert_same_hiddens(hiddens, eager_hiddens)
    assert fixed.num_steps == sum(len(tokens) - 1 for tokens in eager) > 0
    # cluster mode's layers after the anchor (layer 1) read its table and share its buffer; the other modes
    # have no anchor, so each layer has a buffer of its own
    buffers = {entry[1].tables.shape[0] for entry in fixed._graphs.values()}
    assert buffers == ({2} if mode == "cluster" else {engine.spec.num_layers})


def test_questions_that_measure_recall_or_rescore_decode_eagerly(tiny_model, bikes_frames):
    engine = _camera(tiny_model, bikes_frames[:16], rescore_every_tokens=4)
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


def test_interleaved_questions_step_together_and_each_compute_their_own(tiny_model, bikes_frames, monkeypatch):
    """The engine loop steps its running answers in turn: the first one asked steps both, as rows of one batch."""
    engine = _camera(tiny_model, bikes_frames[:24])
    hiddens = record_hiddens(tiny_model, monkeypatch)
    _interleaved(engine)
    eager_hiddens = list(hiddens)
    fixed = _fixed(engine, tiny_model)
    engine.answer("cam", QUESTIONS[0], max_new_tokens=4)  # the buffers of one row exist from now on
    hiddens.clear()
    _interleaved(engine)
    assert_same_hiddens(rows_of(hiddens), eager_hiddens)
    assert fixed.num_steps == 3 + 11  # the single question's 3, then both answers' 11 together
    assert fixed.num_rows == 3 + 2 * 11


def test_a_batch_takes_questions_as_they_join_and_leave(tiny_model, bikes_frames, monkeypatch):
    """Three answers of different lengths on two streams, started at different steps: rows join and leave, and
    every answer's hidden states are those it computes alone."""
    engine = _eager_engine(tiny_model)
    for camera, frames in (("a", bikes_frames[:16]), ("b", bikes_frames[16:40])):
        engine.open_stream(camera)
        feed(engine, camera, frames)
    asks = [("a", QUESTIONS[0], 9), ("b", QUESTIONS[1], 5), ("a", QUESTIONS[1], 7)]
    starts = (0, 2, 3)  # the round each answer starts in
    hiddens = record_hiddens(tiny_model, monkeypatch)
    alone = []
    for camera, question, tokens in asks:
        hiddens.clear()
        engine.answer(camera, question, max_new_tokens=tokens)
        alone.append(list(hiddens))
    fixed = _fixed(engine, tiny_model)
    batches = []  # the answers of each batched step, in row order
    entry = fixed._entry
    monkeypatch.setattr(fixed, "_entry", lambda plans, *args: batches.append(plans) or entry(plans, *args))
    hiddens.clear()
    running, mine = {}, {i: [] for i in range(len(asks))}
    for round_ in range(40):
        if round_ in starts:
            i = starts.index(round_)
            running[i] = engine.ask(asks[i][0], asks[i][1], max_new_tokens=asks[i][2])
        for i, answer in list(running.items()):
            recorded, batched = len(hiddens), len(batches)
            if next(answer, None) is None:
                del running[i]
            if len(hiddens) == recorded:
                continue
            (hidden,) = hiddens[recorded:]
            if len(batches) == batched:  # the answer's prefill
                mine[i].append(hidden)
                continue
            for plan, row in zip(batches[-1], rows_of([hidden]), strict=True):
                mine[_asked(tiny_model, plan, asks)].append(row)
        if not running and round_ > starts[-1]:
            break
    for i in range(len(asks)):
        assert_same_hiddens(mine[i], alone[i])
    assert max(len(b) for b in batches) == 3 and fixed.num_rows > fixed.num_steps


def test_an_abandoned_answer_leaves_the_batch(tiny_model, bikes_frames, monkeypatch):
    """A reader that stops reading (a deadline, a cancel) closes its answer: its pages go back, so no later step
    may write them, and the answer still running computes what it computes alone."""
    engine = _camera(tiny_model, bikes_frames[:24])
    hiddens = record_hiddens(tiny_model, monkeypatch)
    engine.answer("cam", QUESTIONS[1], max_new_tokens=10)
    alone = list(hiddens)
    fixed = _fixed(engine, tiny_model)
    hiddens.clear()
    abandoned = engine.ask("cam", QUESTIONS[0], max_new_tokens=10)
    kept = engine.ask("cam", QUESTIONS[1], max_new_tokens=10)
    next(abandoned)
    abandoned_prefill = len(hiddens)
    for _ in range(3):
        next(kept)
        next(abandoned)  # its next token was stepped with the kept answer's
    abandoned.close()
    list(kept)
    assert fixed._offered == {} and fixed._ready == {} and fixed._joined == {}
    rows = rows_of(hiddens[abandoned_prefill:])
    kept_rows = [rows[0], *rows[2:7:2], *rows[7:]]  # its prefill, its rows of the 3 shared steps, then alone
    assert_same_hiddens(kept_rows, alone)


def _asked(model, plan, asks) -> int:
    """Which of ``asks`` a question plan answers: by its stream and its room for question and answer."""
    (i,) = [
        i
        for i, (camera, question, tokens) in enumerate(asks)
        if plan.stream.stream_id == camera and plan.capacity_tokens == len(model.question_ids(question)) + tokens
    ]
    return i


def test_a_device_pool_grown_mid_answer_retires_the_buffers_built_on_the_old_one(tiny_model, bikes_frames, monkeypatch):
    """Full mode grows its pool when history outgrows it, and ingest goes on while an answer decodes."""
    engine = _camera(tiny_model, bikes_frames[:8], mode="full", device_budget_bytes=1 << 20)
    reference = _camera(tiny_model, bikes_frames[:8], mode="full", device_budget_bytes=1 << 20)
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
