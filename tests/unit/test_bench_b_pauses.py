"""Scenario B's pauses (``mosaic_core.bench.b_pauses``): a question asked during a call starts at the call's first
pause, before the call ends, and answers as the same question asked at that point without a call would."""

from __future__ import annotations

from mosaic_core.bench.b_pauses import QuestionAtPause, call_pauses
from mosaic_core.engine.results import Answer, FrameInput, TokenEvent
from tests.unit.engine_helpers import feed, with_history

QUESTION = "When did the cyclist pass the camera?"
STREAMS = ("cam-a", "cam-b")


def _opened(tiny_model, bikes_frames):
    return with_history(tiny_model, bikes_frames, STREAMS)


def test_a_question_asked_during_a_call_starts_at_its_first_pause_and_finishes_after(tiny_model, bikes_frames):
    expected = _opened(tiny_model, bikes_frames).answer("cam-a", QUESTION, max_new_tokens=3).token_ids
    engine = _opened(tiny_model, bikes_frames)
    asked = QuestionAtPause(engine, "cam-a", QUESTION, max_new_tokens=3)
    pauses = call_pauses(2, 1, asked.serve)
    engine.ingest([FrameInput(s, t, rgb) for i, s in enumerate(STREAMS) for t, rgb in bikes_frames[i + 16 : i + 17]],
                  pauses=pauses)  # fmt: skip
    assert pauses.num_pauses > 1 and asked.started
    assert [type(e) for e in asked.events] == [TokenEvent]  # its first token came inside the call
    answer = asked.finish()
    assert isinstance(answer, Answer) and answer.token_ids == expected  # started after the tower: no new frame yet


def test_without_pauses_the_question_is_asked_after_the_call(tiny_model, bikes_frames):
    engine = _opened(tiny_model, bikes_frames)
    asked = QuestionAtPause(engine, "cam-a", QUESTION, max_new_tokens=2)
    assert call_pauses(0, 1, asked.serve) is None
    engine.ingest([FrameInput("cam-a", t, rgb) for t, rgb in bikes_frames[16:17]])
    assert not asked.started
    assert asked.finish().token_ids == _answer_after_one_more_frame(tiny_model, bikes_frames)


def _answer_after_one_more_frame(tiny_model, bikes_frames) -> list[int]:
    engine = _opened(tiny_model, bikes_frames)
    feed(engine, "cam-a", bikes_frames[16:17])
    return engine.answer("cam-a", QUESTION, max_new_tokens=2).token_ids
