"""A prefill whose later layers read fixed buffers (what a CUDA graph replays) computes the eager prefill.

On the CPU the fixed-buffer layers run eagerly (``capture=False``): the same padded hidden states, slot tables,
lengths and writes a replay reads. The final hidden state of the prefill and of every decode step after it is
compared, since the pad rows' KV lands in slots the answer's own tokens must overwrite before anything reads them.
``mosaic bench profile`` compares replayed graphs with eager passes on a GPU.
"""

from __future__ import annotations

import pytest

from mosaic_core.engine import prefill_graphs
from mosaic_core.engine.decode_graphs import DecodeGraphs
from mosaic_core.engine.prefill_graphs import QUESTION_STEP, PrefillGraphs, padded_length
from tests.engine.engine_helpers import feed, make_engine
from tests.engine.hidden_recorder import assert_same_hiddens, record_hiddens

QUESTIONS = (
    "What happened on the road?",
    "When did the cyclist pass the red car, and which way was the white van facing while it waited at the corner?",
)


def _fixed(engine, model, *, decode_too: bool = False, segment_layers: int = 4) -> PrefillGraphs:
    pools = engine.tiering.tiers.pools
    graphs = PrefillGraphs(model, pools, enabled=True, segment_layers=segment_layers, capture=False)
    engine.parts.prefill_graphs = graphs
    if decode_too:
        engine.parts.decode_graphs = DecodeGraphs(model, pools, engine.spec.num_layers, enabled=True, capture=False)
    return graphs


def test_the_questions_are_padded(tiny_model):
    lengths = [len(tiny_model.question_ids(q)) for q in QUESTIONS]
    assert all(n % QUESTION_STEP for n in lengths)  # pad rows exist
    assert len({padded_length(n) for n in lengths}) == 2  # two graph shapes


@pytest.mark.parametrize(
    ("mode", "decode_too", "segment_layers", "anchor"),
    [
        ("cluster", False, 4, 1),
        ("frame", False, 4, 1),
        ("cluster", True, 4, 1),
        ("cluster", False, 1, 1),
        ("cluster", False, 4, 0),  # one anchor layer: two pieces
        ("cluster", False, 4, 2),  # three anchor layers: four pieces
    ],
)
def test_fixed_buffer_layers_compute_the_eager_prefill(
    tiny_model, bikes_frames, mode, decode_too, segment_layers, anchor, monkeypatch
):
    # Graphs off, so that on CUDA too the answers below run eagerly: there graphs are on by default, and their
    # captures' warm-ups run the model as well, which records hidden states the eager answers never computed.
    engine = make_engine(tiny_model, mode=mode, prefetch_after_layer=anchor, prefill_graphs=False, decode_graphs=False)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:24])
    hiddens = record_hiddens(tiny_model, monkeypatch)
    eager = [engine.answer("cam", q, max_new_tokens=8) for q in QUESTIONS]
    eager_hiddens = list(hiddens)
    fixed = _fixed(engine, tiny_model, decode_too=decode_too, segment_layers=segment_layers)  # 1: two, one a layer
    hiddens.clear()
    answers = [engine.answer("cam", q, max_new_tokens=8) for q in QUESTIONS]
    assert [a.token_ids for a in answers] == [a.token_ids for a in eager]
    assert_same_hiddens(hiddens, eager_hiddens)
    assert [[s.cluster_id for s in a.evidence] for a in answers] == [[s.cluster_id for s in a.evidence] for a in eager]
    assert fixed.num_prefills == fixed.num_anchor_prefills == len(QUESTIONS)


def test_each_segment_waits_only_for_its_own_layers_staging(tiny_model, bikes_frames, monkeypatch):
    """The chain is what lets later layers' KV cross PCIe while earlier layers compute: the compute stream must
    wait for a layer's staging right before that layer's segment, not for every layer up front."""
    engine = make_engine(tiny_model)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:24])
    _fixed(engine, tiny_model, segment_layers=1)
    events, transfers = [], engine.tiering.tiers.transfers
    real_wait, real_layers = transfers.wait, prefill_graphs.fixed_layers
    monkeypatch.setattr(transfers, "wait", lambda moved: events.append("wait") or real_wait(moved))

    def layers(model, fixed, hidden, layer_range):
        events.append(tuple(layer_range))
        return real_layers(model, fixed, hidden, layer_range)

    monkeypatch.setattr(prefill_graphs, "fixed_layers", layers)
    engine.answer("cam", QUESTIONS[0], max_new_tokens=1)
    chain = events[events.index((2,)) - 1 : events.index((3,)) + 1]
    assert chain == ["wait", (2,), "wait", (3,)]


def test_a_one_token_answer_still_has_room_for_the_padded_question(tiny_model, bikes_frames):
    engine = make_engine(tiny_model)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:16])
    fixed = _fixed(engine, tiny_model)
    engine.answer("cam", QUESTIONS[0], max_new_tokens=1)
    assert fixed.num_prefills == 1


@pytest.mark.parametrize("mode", ["token", "full"])
def test_modes_that_score_every_layer_prefill_eagerly(tiny_model, bikes_frames, mode):
    engine = make_engine(tiny_model, mode=mode)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:16])
    fixed = _fixed(engine, tiny_model)
    engine.answer("cam", QUESTIONS[0], max_new_tokens=4)
    assert fixed.num_prefills == 0


def test_questions_that_measure_recall_prefill_eagerly(tiny_model, bikes_frames):
    engine = make_engine(tiny_model)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:16])
    fixed = _fixed(engine, tiny_model)
    engine.answer("cam", QUESTIONS[0], max_new_tokens=4, measure_recall=True)
    assert fixed.num_prefills == 0


def test_graphs_need_cuda(tiny_model, bikes_frames):
    engine = make_engine(tiny_model)
    graphs = PrefillGraphs(tiny_model, engine.tiering.tiers.pools, enabled=True)
    assert graphs.enabled == (tiny_model.device.type == "cuda")
