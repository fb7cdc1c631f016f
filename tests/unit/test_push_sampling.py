"""The router's guess of which pushed frames its worker samples out (``services.push_sampling``), against the worker's
own sampler (``IngestQueues.put``) and its frame intake (``FrameIntake.push``) on the same random timestamps.

A guess from the worker's current grid is the sampler's decision exactly; a guess from an out-of-date grid (frames of
another call or router in between) may be wrong, and then the worker asks for the pixels: either way every frame ends
as it would have had the router decoded it, with the same counts and refusals.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaic_core.errors import MosaicError
from services.config import load_config
from services.ingest_queue import IngestQueues, PutOutcome, QueuedFrame
from services.metadata import StreamRecord
from services.push_sampling import PushSampling
from services.session import StreamSession
from services.telemetry import WorkerTelemetry
from services.worker_frames import FrameIntake

RGB = np.zeros((4, 4, 3), dtype=np.uint8)
FPS = {"a": 2.0, "b": 3.0}
# Steps between a stream's frames: back, none (a duplicate), within a slot, across slots, and past the push clock.
STEPS_S = st.sampled_from([-0.3, 0.0, 0.01, 0.033, 0.1, 0.2, 1 / 3, 0.45, 0.5, 1.0, 2.5])
# The same for the intake, whose push clock runs on the monotonic clock: steps of 0.05 s and a limit half a step off
# them, so a frame is ahead of the clock or not whatever a few milliseconds of the test's own time add.
INTAKE_STEPS_S = st.sampled_from([-0.3, 0.0, 0.05, 0.1, 0.2, 0.35, 0.45, 0.5, 1.0, 2.5])
MAX_SKEW_S = 2.025


def _frame(stream_id: str, timestamp_s: float) -> QueuedFrame:
    return QueuedFrame(stream_id, timestamp_s, RGB, 0.0)


def _put(queues: IngestQueues, stream_id: str, timestamp_s: float) -> PutOutcome | str:
    try:
        return queues.put(_frame(stream_id, timestamp_s))
    except MosaicError as err:
        return f"{type(err).__name__}: {err}"


def _timestamps(steps: list[tuple[str, float]], start_s: float) -> list[tuple[str, float]]:
    """Each stream's timestamps, from ``start_s`` on by its own steps."""
    clocks = dict.fromkeys(FPS, start_s)
    frames = []
    for stream_id, step_s in steps:
        clocks[stream_id] = clocks[stream_id] + step_s
        frames.append((stream_id, clocks[stream_id]))
    return frames


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(st.tuples(st.sampled_from(sorted(FPS)), STEPS_S), max_size=60),
    start_s=st.sampled_from([0.0, 7.3, 1.7e9 + 0.123]),
)
def test_the_guess_from_the_workers_grid_is_the_samplers_decision(steps, start_s):
    """Before every frame the guess reads the grid the sampler holds then: it skips exactly the frames the sampler
    samples out, never one it keeps or refuses."""
    queues = IngestQueues(max_frames_per_stream=1000)
    for stream_id, fps in FPS.items():
        queues.add_stream(stream_id, fps)
    sampling = PushSampling()
    for stream_id, timestamp_s in _timestamps(steps, start_s):
        grid = queues.grid(stream_id)
        if grid is not None:
            sampling.learn({stream_id: grid})
        skipped = sampling.skips(stream_id, timestamp_s)
        outcome = _put(queues, stream_id, timestamp_s)
        assert skipped == (outcome is PutOutcome.SAMPLED_OUT), (stream_id, timestamp_s, grid, outcome)


def _intake() -> tuple[FrameIntake, WorkerTelemetry]:
    config = load_config(None, max_push_skew_s=MAX_SKEW_S)
    queues, telemetry = IngestQueues(max_frames_per_stream=4), WorkerTelemetry("w")
    sessions = {s: StreamSession(StreamRecord(stream_id=s, fps=fps)) for s, fps in FPS.items()}
    for stream_id, fps in FPS.items():
        queues.add_stream(stream_id, fps)
    return FrameIntake(config, None, queues, telemetry, sessions), telemetry


def _push_guessing(intake: FrameIntake, sampling: PushSampling, index: int, stream_id: str, timestamp_s: float):
    """One frame as the router pushes it (``PushCalls._push_one``): without its pixels where the guess skips it, and
    again with them where its worker asks."""
    if sampling.skips(stream_id, timestamp_s):
        part = intake.push([(index, stream_id, timestamp_s, None)])
        sampling.learn(part.grids)
        if index not in part.needs_pixels:
            return part
    part = intake.push([(index, stream_id, timestamp_s, RGB)])
    sampling.learn(part.grids)
    return part


def test_a_stream_pushed_faster_than_its_fps_is_mostly_not_decoded():
    """30 frames a second for 3 s into a 2-fps stream: the first frame of each slot is decoded, the 84 others are
    sampled out without their pixels, and the totals are those of 90 decoded frames."""
    intake, telemetry = _intake()
    sampling = PushSampling()
    num_without_pixels = sampled_out = 0
    for index in range(90):
        timestamp_s = 100.0 + index / 30
        num_without_pixels += sampling.skips("a", timestamp_s)
        sampled_out += _push_guessing(intake, sampling, index, "a", timestamp_s).sampled_out
    assert (num_without_pixels, sampled_out, telemetry.totals("a").received) == (84, 84, 6)


def _tally(part) -> tuple:
    """A push's counts and refusals; a refusal's push clock (``StreamSession.check_push``) left out, as it reads the
    monotonic clock, a little later for one intake than for the other."""
    refusals = [(r.stream_id, re.sub(r"clock \([^)]*\)", "clock", r.reason), r.code) for r in part.rejected]
    return part.accepted, part.dropped, part.sampled_out, refusals


def _restart(intake: FrameIntake, stream_id: str) -> None:
    """The stream as its worker restarted holds it: a new grid and push clock, its totals kept."""
    intake.queues.remove_stream(stream_id)
    intake.queues.add_stream(stream_id, FPS[stream_id])
    intake.sessions[stream_id] = StreamSession(StreamRecord(stream_id=stream_id, fps=FPS[stream_id]))


@settings(max_examples=400, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from([*sorted(FPS), "gone"]),
            INTAKE_STEPS_S,
            st.sampled_from(["this router"] * 6 + ["another router"] * 3 + ["restart"]),
        ),
        max_size=60,
    ),
    start_s=st.sampled_from([0.0, 7.3]),
)
def test_frames_end_as_they_would_decoded_whatever_the_router_last_heard(steps, start_s):
    """Frames of this router, of another (which pushes every frame decoded, unheard by this one), of an unknown stream,
    and streams their worker restarts: through one intake each frame's result, each stream's totals and its grid are
    those of the same frames all decoded."""
    guessed, guessed_telemetry = _intake()
    decoded, decoded_telemetry = _intake()
    sampling = PushSampling()
    clocks = dict.fromkeys([*FPS, "gone"], start_s)
    for index, (stream_id, step_s, who) in enumerate(steps):
        if who == "restart":
            if stream_id in FPS:
                _restart(guessed, stream_id)
                _restart(decoded, stream_id)
            continue
        clocks[stream_id] += step_s
        timestamp_s = clocks[stream_id]
        expected = decoded.push([(index, stream_id, timestamp_s, RGB)])
        if who == "this router":
            part = _push_guessing(guessed, sampling, index, stream_id, timestamp_s)
        else:
            part = guessed.push([(index, stream_id, timestamp_s, RGB)])
        assert _tally(part) == _tally(expected), (index, stream_id, timestamp_s)
    for stream_id in FPS:
        assert guessed_telemetry.totals(stream_id) == decoded_telemetry.totals(stream_id)
        assert guessed.queues.grid(stream_id) == decoded.queues.grid(stream_id)


@pytest.mark.parametrize(
    ("step_s", "why"),
    [(MAX_SKEW_S + 1.0, "ahead of the stream's clock"), (0.0, "not after the previous frame")],
)
def test_a_frame_without_pixels_is_refused_as_the_decoded_frame_would_be(step_s, why):
    """A frame sent without its pixels still meets the push clock and the timestamp order, before its slot."""
    intake, telemetry = _intake()
    intake.push([(0, "a", 10.0, RGB)])
    part = intake.push([(1, "a", 10.0 + step_s, None)])
    assert (part.sampled_out, part.needs_pixels) == (0, [])
    assert [r.index for r in part.rejected] == [1] and why in part.rejected[0].reason, part
    assert telemetry.totals("a").dropped == 1


def test_a_frame_without_pixels_its_worker_would_keep_changes_nothing_there():
    intake, telemetry = _intake()
    intake.push([(0, "a", 10.0, RGB)])
    before = intake.queues.grid("a")
    part = intake.push([(1, "a", 10.6, None)])  # the next 2-fps slot: kept, so its pixels are asked for
    assert (part.accepted, part.sampled_out, part.needs_pixels) == (0, 0, [1])
    assert intake.queues.grid("a") == before == part.grids["a"]
    assert telemetry.totals("a").received == 1
    assert intake.push([(1, "a", 10.6, RGB)]).accepted == 1


def test_the_router_forgets_deleted_streams():
    sampling = PushSampling()
    queues = IngestQueues(max_frames_per_stream=4)
    for stream_id in ("kept", "deleted"):
        queues.add_stream(stream_id, 1.0)
        queues.put(_frame(stream_id, 1.0))
        sampling.learn({stream_id: queues.grid(stream_id)})
    sampling.keep_only({"kept": 0})
    assert (sampling.num_streams, sampling.skips("kept", 1.5), sampling.skips("deleted", 1.5)) == (1, True, False)
