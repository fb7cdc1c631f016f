"""A profiled question times its scoring and fetching (CUDA events on a GPU, ``MOSAIC_TEST_DEVICE=cuda``) and
answers as an unprofiled one: timing a stage must not change what the question reads."""

from __future__ import annotations

from tests.engine.engine_helpers import feed, make_engine

QUESTION = "When did the cyclist pass the camera?"


def _answer(tiny_model, frames, *, profile: bool):
    engine = make_engine(tiny_model, device_budget_bytes=1 << 20)  # most clusters on the host: a fetch to time
    engine.open_stream("cam")
    feed(engine, "cam", frames)
    assert any(c.tier == "host" for c in engine.clusters("cam"))
    return engine.answer("cam", QUESTION, max_new_tokens=4, profile=profile)


def test_a_profiled_question_times_its_stages_and_answers_as_an_unprofiled_one(tiny_model, bikes_frames):
    plain = _answer(tiny_model, bikes_frames[:40], profile=False)
    profiled = _answer(tiny_model, bikes_frames[:40], profile=True)
    assert profiled.token_ids == plain.token_ids
    assert plain.timings.retrieval_s == 0.0
    timings = profiled.timings
    assert timings.score_s > 0 and timings.fetch_s > 0, timings
    assert timings.retrieval_s == timings.score_s + timings.fetch_s
    assert timings.retrieval_s < timings.time_to_first_token_s, timings


def test_the_time_to_first_token_counts_from_the_ask_and_holds_the_set_up(tiny_model, bikes_frames, monkeypatch):
    """Choosing the candidate clusters is the question's work too: a slow choice shows in its first token."""
    import time

    from mosaic_core.engine import questions

    engine = make_engine(tiny_model)
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:12])
    choose = questions._candidates

    def slow_choice(*args, **kwargs):
        time.sleep(0.05)
        return choose(*args, **kwargs)

    monkeypatch.setattr(questions, "_candidates", slow_choice)
    timings = engine.answer("cam", QUESTION, max_new_tokens=2).timings
    assert timings.setup_s >= 0.05, timings
    assert timings.time_to_first_token_s >= timings.setup_s + timings.retrieval_s, timings
