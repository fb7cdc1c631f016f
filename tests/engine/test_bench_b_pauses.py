"""Scenario B's pauses (``mosaic_core.bench.b_pauses``): a question asked during a call starts at the call's first
pause, before the call ends, and answers as the same question asked at that point without a call would."""

from __future__ import annotations

import pytest

from mosaic_core.bench.b_pauses import PauseVariant, QuestionAtPause, call_pauses
from mosaic_core.engine.results import Answer, FrameInput, TokenEvent
from tests.engine.engine_helpers import feed, with_history

QUESTION = "When did the cyclist pass the camera?"
STREAMS = ("cam-a", "cam-b")


def _opened(tiny_model, bikes_frames):
    return with_history(tiny_model, bikes_frames, STREAMS)


def test_a_question_asked_during_a_call_starts_at_its_first_pause_and_finishes_after(tiny_model, bikes_frames):
    expected = _opened(tiny_model, bikes_frames).answer("cam-a", QUESTION, max_new_tokens=3).token_ids
    engine = _opened(tiny_model, bikes_frames)
    asked = QuestionAtPause(engine, "cam-a", QUESTION, max_new_tokens=3)
    pauses = call_pauses(PauseVariant(every_layers=2), asked)
    engine.ingest([FrameInput(s, t, rgb) for i, s in enumerate(STREAMS) for t, rgb in bikes_frames[i + 16 : i + 17]],
                  pauses=pauses)  # fmt: skip
    assert pauses.num_pauses > 1 and asked.started
    assert [type(e) for e in asked.events] == [TokenEvent]  # its first token came inside the call
    answer = asked.finish()
    assert isinstance(answer, Answer) and answer.token_ids == expected  # started after the tower: no new frame yet


def test_without_pauses_the_question_is_asked_after_the_call(tiny_model, bikes_frames):
    engine = _opened(tiny_model, bikes_frames)
    asked = QuestionAtPause(engine, "cam-a", QUESTION, max_new_tokens=2)
    assert call_pauses(PauseVariant.parse("off"), asked) is None
    engine.ingest([FrameInput("cam-a", t, rgb) for t, rgb in bikes_frames[16:17]])
    assert not asked.started
    assert asked.finish().token_ids == _answer_after_one_more_frame(tiny_model, bikes_frames)


def test_skipping_idle_pauses_the_question_still_starts_at_the_first_and_no_later_pause_serves(
    tiny_model, bikes_frames
):
    engine = _opened(tiny_model, bikes_frames)
    asked = QuestionAtPause(engine, "cam-a", QUESTION, max_new_tokens=3)
    pauses = call_pauses(PauseVariant.parse("every2-skip-idle"), asked)
    served = []

    def serve_counted():
        served.append(pauses.num_pauses)
        asked.serve()

    pauses.serve = serve_counted
    engine.ingest([FrameInput(s, t, rgb) for i, s in enumerate(STREAMS) for t, rgb in bikes_frames[i + 16 : i + 17]],
                  pauses=pauses)  # fmt: skip
    assert served == [1] and pauses.num_pauses > 1
    assert (
        asked.finish().token_ids
        == _opened(tiny_model, bikes_frames).answer("cam-a", QUESTION, max_new_tokens=3).token_ids
    )


@pytest.mark.parametrize(
    ("name", "variant"),
    [
        ("off", PauseVariant()),
        ("every4", PauseVariant(4)),
        ("every4-ahead3", PauseVariant(4, 3)),
        ("every4-skip-idle", PauseVariant(4, 1, True)),
        ("every8-ahead2-skip-idle", PauseVariant(8, 2, True)),
    ],
)
def test_pause_variants_are_named_as_parsed(name, variant):
    assert PauseVariant.parse(name) == variant and variant.name == name


@pytest.mark.parametrize("name", ["every0", "every4-ahead0", "4", "every4-skip", "every-ahead2", ""])
def test_a_malformed_pause_variant_is_refused_with_the_grammar(name):
    with pytest.raises(ValueError, match="every<L>"):
        PauseVariant.parse(name)


def _answer_after_one_more_frame(tiny_model, bikes_frames) -> list[int]:
    engine = _opened(tiny_model, bikes_frames)
    feed(engine, "cam-a", bikes_frames[16:17])
    return engine.answer("cam-a", QUESTION, max_new_tokens=2).token_ids
