"""Two questions interleaved on one stream, as the service's engine loop runs them: the first one's clusters are
pinned until it ends (the second one's maintenance cannot merge them away), and each answer's statistics are its
own, not differences of engine-wide counters."""

from __future__ import annotations

import pytest

from mosaic_core.config import MIB
from mosaic_core.engine.results import Answer
from tests.engine.engine_helpers import feed, make_engine
from tests.engine.hidden_recorder import assert_same_hiddens, record_hiddens


def _engine(tiny_model):
    # Eager merges, and a device budget small enough that retrieved clusters are gathered from the host.
    return make_engine(
        tiny_model, device_budget_bytes=int(1.3 * MIB), merge_min_questions=1, merge_min_joint_fraction=0.5
    )


def test_a_question_keeps_its_clusters_while_another_merges(tiny_model, bikes_frames):
    engine = _engine(tiny_model)
    engine.open_stream("cam", fps=2.0)
    feed(engine, "cam", bikes_frames[:40])
    first = engine.ask("cam", "what moved?", max_new_tokens=4)
    next(first)  # A has retrieved and holds its clusters
    assert engine.tiering.residency.stats().num_pinned > 0
    for _ in range(3):  # B, asked again and again, proposes merges of what it retrieves
        engine.answer("cam", "what moved?", max_new_tokens=1)
    answer = [event for event in first][-1]
    assert isinstance(answer, Answer)
    live = {c.cluster_id for c in engine.clusters("cam")}
    assert {span.cluster_id for span in answer.evidence} <= live
    assert engine.tiering.residency.stats().num_pinned == 0


def test_an_abandoned_question_releases_its_pins(tiny_model, bikes_frames):
    engine = _engine(tiny_model)
    engine.open_stream("cam", fps=2.0)
    feed(engine, "cam", bikes_frames[:24])
    question = engine.ask("cam", "what moved?", max_new_tokens=8)
    next(question)
    assert engine.tiering.residency.stats().num_pinned > 0
    question.close()  # a deadline or a cancelled call
    assert engine.tiering.residency.stats().num_pinned == 0
    engine.close_stream("cam")  # nothing is left pinned to stop it


def test_statistics_are_per_question_when_questions_interleave(tiny_model, bikes_frames):
    alone_engine, mixed_engine = _engine(tiny_model), _engine(tiny_model)
    for engine in (alone_engine, mixed_engine):
        engine.open_stream("cam", fps=2.0)
        for lap in range(3):  # more history than the device tier holds
            feed(engine, "cam", bikes_frames[:40], offset_s=lap * 100.0)
    alone = alone_engine.answer("cam", "what moved?", max_new_tokens=6).retrieval
    question = mixed_engine.ask("cam", "what moved?", max_new_tokens=6)
    events = [next(question)]
    other = mixed_engine.ask("cam", "who is there?", max_new_tokens=6)
    for event in question:  # B's steps run between A's tokens
        events.append(event)
        next(other, None)
    mixed = events[-1].retrieval
    assert alone.bytes_fetched > 0, "the device budget must force host gathers, or this test shows nothing"
    assert (mixed.bytes_fetched, mixed.num_copies, mixed.device_hits, mixed.device_lookups) == (
        alone.bytes_fetched, alone.num_copies, alone.device_hits, alone.device_lookups,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["token", "cluster"])
def test_frames_ingested_during_an_answer_do_not_change_what_it_attends_to(tiny_model, bikes_frames, mode, monkeypatch):
    """The answer reads the stream's window in place; frames pushed through the window while it decodes hand
    their pages on or, in token mode, copy them to the host and free them at once. The question's hold on the
    pages it read keeps them from being reused under it by the frames that follow."""
    quiet, busy = (make_engine(tiny_model, mode=mode, device_budget_bytes=int(1.3 * MIB)) for _ in range(2))
    for engine in (quiet, busy):
        engine.open_stream("cam", fps=2.0)
        feed(engine, "cam", bikes_frames[:24])
    hiddens = record_hiddens(tiny_model, monkeypatch)  # every step's: the tiny preset repeats one token
    expected = quiet.answer("cam", "what moved?", max_new_tokens=6)
    expected_hiddens = list(hiddens)
    hiddens.clear()
    question = busy.ask("cam", "what moved?", max_new_tokens=6)
    events = [next(question)]
    attended = set(busy.stream("cam").past_pages())
    feed(busy, "cam", bikes_frames[24:40])  # more than a window's worth: every frame it attended to has left
    assert not attended & {p for frame in busy.stream("cam").local for p in frame.pages}, "a held page was reused"
    events += list(question)
    assert events[-1].token_ids == expected.token_ids
    assert_same_hiddens(hiddens, expected_hiddens)
    assert busy.tiering.residency.reserved_bytes() == sum(s.reserved_bytes for s in busy.streams.values())
