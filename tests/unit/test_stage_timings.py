"""A profiled question times its scoring and fetching (CUDA events on a GPU, ``MOSAIC_TEST_DEVICE=cuda``) and
answers as an unprofiled one: timing a stage must not change what the question reads."""

from __future__ import annotations

from tests.unit.engine_helpers import feed, make_engine

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
