"""The timings a multi-stream question reports: the parts of its time to first token are those of the stream whose
token came first, so that no part is longer than the whole."""

from __future__ import annotations

from mosaic_core.engine.results import Answer, AnswerTimings, RetrievalStats
from services.convert import timings_event


def _answer(stream_id: str, *, start_wait_s: float, first_token_s: float) -> Answer:
    timings = AnswerTimings(time_to_first_token_s=first_token_s, start_wait_s=start_wait_s, num_tokens=4)
    return Answer(stream_id, "q", "", [], [], timings, RetrievalStats(bytes_fetched=10))


def test_the_parts_are_the_first_tokens_stream_s() -> None:
    quick = _answer("lobby", start_wait_s=0.0, first_token_s=0.02)
    held = _answer("street", start_wait_s=0.038, first_token_s=0.05)  # waited behind an ingest call
    event = timings_event([held, quick], queue_s=0.0, ttft_s=0.028, decode_s=0.2, first_stream_id="lobby")
    t = event.timings
    assert (t.start_wait_s, t.engine_first_token_s) == (0.0, 0.02)
    assert t.start_wait_s + t.engine_first_token_s <= t.time_to_first_token_s
    assert (t.num_tokens, t.bytes_fetched) == (8, 20)  # the totals stay over every stream


def test_without_a_first_token_the_parts_are_the_longest() -> None:
    answers = [_answer("a", start_wait_s=0.01, first_token_s=0.02), _answer("b", start_wait_s=0.03, first_token_s=0.01)]
    t = timings_event(answers, queue_s=0.0, ttft_s=0.0, decode_s=0.0).timings
    assert (t.start_wait_s, t.engine_first_token_s) == (0.03, 0.02)
