"""Bad input raises a typed error with a clear message and leaves the stream usable."""

from __future__ import annotations

import numpy as np
import pytest

from mosaic_core.bookkeeping.formation_config import FormationConfig
from mosaic_core.config import MIB, EngineConfig
from mosaic_core.engine.results import FrameInput
from mosaic_core.errors import (
    AlreadyExistsError,
    BudgetError,
    ConfigError,
    EmptyBatchError,
    InvalidArgumentError,
    InvalidFrameError,
    OutOfRangeError,
    StreamClosedError,
    TimestampOrderError,
    UnknownPolicyError,
    UnknownStreamError,
)
from tests.engine.engine_helpers import feed, make_engine


@pytest.fixture(scope="module")
def engine(tiny_model, bikes_frames):
    engine = make_engine(tiny_model, mode="cluster")
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:12])
    return engine


def _rgb(h=96, w=128):
    return np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _last_ts(engine):
    return engine.stream_stats("cam").last_timestamp_s


BAD_FRAMES = [
    (
        "float dtype",
        lambda ts: [FrameInput("cam", ts + 1, _rgb().astype(np.float32))],
        InvalidFrameError,
        "dtype",
    ),
    ("rank 2", lambda ts: [FrameInput("cam", ts + 1, _rgb()[:, :, 0])], InvalidFrameError, "shape"),
    (
        "four channels",
        lambda ts: [FrameInput("cam", ts + 1, np.zeros((96, 128, 4), np.uint8))],
        InvalidFrameError,
        "3",
    ),
    (
        "zero size",
        lambda ts: [FrameInput("cam", ts + 1, np.zeros((0, 128, 3), np.uint8))],
        InvalidFrameError,
        "empty side",
    ),
    (
        "huge",
        lambda ts: [FrameInput("cam", ts + 1, np.zeros((9000, 16, 3), np.uint8))],
        InvalidFrameError,
        "8192",
    ),
    ("time goes back", lambda ts: [FrameInput("cam", ts - 5.0, _rgb())], TimestampOrderError, "increase"),
    (
        "same time twice",
        lambda ts: [FrameInput("cam", ts + 1, _rgb()), FrameInput("cam", ts + 1, _rgb())],
        TimestampOrderError,
        "after",
    ),
    ("unknown stream", lambda ts: [FrameInput("nope", ts + 1, _rgb())], UnknownStreamError, "nope"),
    ("not finite", lambda ts: [FrameInput("cam", float("inf"), _rgb())], InvalidArgumentError, "finite"),
    (
        "good then bad",
        lambda ts: [FrameInput("cam", ts + 1, _rgb()), FrameInput("cam", ts + 2, _rgb()[:, :, :2])],
        InvalidFrameError,
        "3 RGB channels",
    ),
]


@pytest.mark.parametrize(("name", "make", "error", "words"), BAD_FRAMES, ids=[b[0] for b in BAD_FRAMES])
def test_bad_frames_are_rejected_whole_and_the_stream_keeps_working(engine, name, make, error, words):
    before = engine.stream_stats("cam")
    with pytest.raises(error, match=words):
        engine.ingest(make(before.last_timestamp_s))
    after = engine.stream_stats("cam")
    assert after.frames_ingested == before.frames_ingested, "a rejected batch must change nothing"
    engine.ingest([FrameInput("cam", after.last_timestamp_s + 0.25, _rgb())])
    assert engine.stream_stats("cam").frames_ingested == before.frames_ingested + 1


@pytest.mark.parametrize("timestamp_s", [float("nan"), float("-inf")])
def test_a_first_frame_at_no_finite_time_is_refused_before_the_stream_changes(engine, timestamp_s):
    """A stream's first frame sets its clock: one at NaN or -inf would leave every later frame "not after" it."""
    engine.open_stream("fresh")
    try:
        with pytest.raises(InvalidArgumentError, match="finite"):
            engine.ingest([FrameInput("fresh", timestamp_s, _rgb()), FrameInput("cam", _last_ts(engine) + 1, _rgb())])
        assert engine.stream("fresh").first_timestamp_s is None
        engine.ingest([FrameInput("fresh", 0.0, _rgb())])
        assert engine.stream_stats("fresh").frames_ingested == 1
    finally:
        engine.close_stream("fresh")


def test_empty_batch(engine):
    with pytest.raises(EmptyBatchError, match="empty"):
        engine.ingest([])


def test_stream_lifecycle_errors(tiny_model):
    engine = make_engine(tiny_model)
    engine.open_stream("a")
    with pytest.raises(AlreadyExistsError, match="already open"):
        engine.open_stream("a")
    with pytest.raises(InvalidArgumentError, match="not valid"):
        engine.open_stream("../etc")
    with pytest.raises(InvalidArgumentError, match="fps"):
        engine.open_stream("b", fps=0)
    state = engine.stream("a")
    engine.close_stream("a")
    with pytest.raises(UnknownStreamError):
        engine.answer("a", "anything?")
    with pytest.raises(StreamClosedError, match="closed"):
        state.check_open()


def test_a_question_whose_stream_closed_before_its_first_read_is_refused(tiny_model, bikes_frames):
    engine = make_engine(tiny_model)
    engine.open_stream("a")
    feed(engine, "a", bikes_frames[:6])
    answer = engine.ask("a", "what moved?", max_new_tokens=2)  # asked, not read yet: it pins nothing
    engine.close_stream("a")
    with pytest.raises(StreamClosedError, match="closed"):
        next(answer)


def test_question_errors(engine):
    with pytest.raises(InvalidArgumentError, match="empty"):
        engine.answer("cam", "   ")
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        engine.answer("cam", "what?", max_new_tokens=0)
    with pytest.raises(InvalidArgumentError, match="tokens long"):
        engine.answer("cam", "why " * 2000)
    # CreateWatch refuses it with the same sentence, counted in the router (tests/unit/test_watch_registry.py)
    with pytest.raises(InvalidArgumentError, match="the question is 1006 tokens long; the limit is 512"):
        engine.answer("cam", "\N{GRINNING FACE}" * 1000)
    with pytest.raises(OutOfRangeError, match="outside"):
        engine.answer("cam", "what?", time_range=(5000.0, 6000.0))
    with pytest.raises(InvalidArgumentError, match="after its end"):
        engine.answer("cam", "what?", time_range=(3.0, 1.0))
    assert engine.answer("cam", "what happened?", max_new_tokens=1).token_ids


def test_budgets_too_small_for_sink_and_window(tiny_model):
    with pytest.raises(BudgetError, match="smaller than"):
        make_engine(tiny_model, device_budget_bytes=64 * 1024)
    engine = make_engine(
        tiny_model,
        device_budget_bytes=int(0.4 * MIB),
        retrieval_budget_tokens=16,
        formation=FormationConfig(max_tokens=16),
    )
    engine.open_stream("a")
    with pytest.raises(BudgetError, match="sink \\+ local window"):
        engine.open_stream("b")
    assert engine.stream_stats("a").sink_tokens > 0  # the first stream is untouched


def test_config_errors():
    with pytest.raises(UnknownPolicyError, match="token, cluster"):
        EngineConfig(mode="nearest")
    with pytest.raises(ConfigError, match="local_window_tokens"):
        EngineConfig(local_window_tokens=0)
    with pytest.raises(ConfigError, match="disk_dir"):
        EngineConfig(disk_budget_bytes=1 << 20)
    with pytest.raises(ConfigError, match="durable_writers"):
        EngineConfig(durable_writers=0)
    with pytest.raises(ConfigError, match="durable_pending_bytes"):
        EngineConfig(durable_pending_bytes=0)
    with pytest.raises(UnknownPolicyError, match="lru"):
        from mosaic_core.bookkeeping.policies import make_policy

        make_policy("random")
