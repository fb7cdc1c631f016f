"""Frames ingested while an answer decodes do not change it: a question reads the slot tables it built at its
prefill (sink and window pages held, retrieved clusters pinned), so the engine loop need not hold the stream
out of ingest until the answer ends."""

from __future__ import annotations

import pytest

from tests.engine.engine_helpers import feed, make_engine
from tests.engine.hidden_recorder import assert_same_hiddens, record_hiddens

QUESTION = "When did the cyclist pass the camera?"


@pytest.mark.parametrize("mode", ["cluster", "frame", "token", "full"])
def test_frames_ingested_mid_answer_leave_the_answer_as_it_was(tiny_model, bikes_frames, mode, monkeypatch):
    reference = make_engine(tiny_model, mode=mode)
    reference.open_stream("cam")
    feed(reference, "cam", bikes_frames[:20])
    hiddens = record_hiddens(tiny_model, monkeypatch)  # every step's, compared: the tiny preset repeats one token
    expected = reference.answer("cam", QUESTION, max_new_tokens=10).token_ids
    expected_hiddens = list(hiddens)

    engine = make_engine(tiny_model, mode=mode)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:20])
    answer = engine.ask("cam", QUESTION, max_new_tokens=10)
    hiddens.clear()
    tokens = [next(answer).token_id]
    for start in range(20, 36, 2):  # frames arrive between tokens, pushing earlier ones out of the window
        feed(engine, "cam", bikes_frames[start : start + 2], batch=2)
        tokens.append(next(answer).token_id)
    tokens += [event.token_id for event in answer if hasattr(event, "token_id")]
    assert engine.stream_stats("cam").frames_ingested == 36
    assert tokens == expected
    assert_same_hiddens(hiddens, expected_hiddens)
