"""A question that arrives while the engine loop is inside an ingest call gets its first token at one of the
call's pauses, before the call ends, and one that arrives as the call's frames are taken gets it before the call
starts; with pauses off either waits for the call, and its answer's timings say so. Real engine (tiny preset on
CPU), real loop; the question is submitted from inside the loop's own ``take_call``, or from inside the engine's
``ingest`` before it starts."""

from __future__ import annotations

import time

import pytest

from mosaic_core.engine.engine import Engine
from mosaic_core.engine.ingest_pauses import IngestPauses
from mosaic_core.engine.results import TokenEvent
from services.engine_loop import EngineLoop
from services.ingest_queue import IngestQueues, QueuedFrame
from services.metadata import InMemoryMetadataStore
from services.publisher import MetadataPublisher, WorkerView
from services.question_job import DONE, QuestionJob
from services.telemetry import WorkerTelemetry
from services.tier_sync import TierSync
from tests.engine.engine_helpers import SMALL, feed

STREAMS = ("cam-0", "cam-1")


class QuestionOnSecondCall(IngestQueues):
    """Real ingest queues that submit one question to the loop as they hand out their second call's frames, or, with
    ``in_the_call``, leave that to the engine (``EngineWatchingAQuestion``), as the call begins."""

    def __init__(self, capacity: int, *, in_the_call: bool) -> None:
        super().__init__(capacity)
        self.loop: EngineLoop | None = None
        self.job: QuestionJob | None = None
        self.num_calls = 0
        self.in_the_call = in_the_call

    def take_call(self, max_frames: int, frames_per_stream: int = 1, **options):
        taken = super().take_call(max_frames, frames_per_stream, **options)
        if taken:
            self.num_calls += 1
            if self.num_calls == 2 and not self.in_the_call:
                self.submit()
        return taken

    def submit(self) -> None:
        self.job = self.loop.questions.submit(
            QuestionJob("q", "cam-0", "what happened?", 3, None, time.monotonic() + 60)
        )


class EngineWatchingAQuestion:
    """The real engine, noting before and after the ingest call the queues' question met whether it had its first
    token yet."""

    def __init__(self, engine: Engine, queues: QuestionOnSecondCall) -> None:
        self._engine, self._queues = engine, queues
        self.token_before_call_started: list[bool] = []
        self.token_before_call_ended: list[bool] = []
        self.question_call_ended_s: float | None = None  # time.monotonic() when the call the question met ended

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def ingest(self, frames, **options):
        if self._queues.in_the_call and self._queues.num_calls == 2 and self._queues.job is None:
            self._queues.submit()
        if self._queues.job is not None and not self.token_before_call_started:
            self.token_before_call_started.append(not self._queues.job.events.empty())
        result = self._engine.ingest(frames, **options)
        if self._queues.job is not None and not self.token_before_call_ended:
            self.token_before_call_ended.append(not self._queues.job.events.empty())
            self.question_call_ended_s = time.monotonic()
        return result


def _loop(engine, queues: IngestQueues, tier_sync: TierSync, **pause_settings) -> EngineLoop:
    """A real engine loop over ``engine``, 16 frames a call, history kept, with ``pause_settings``."""
    return EngineLoop(
        engine,
        queues,
        tier_sync,
        WorkerTelemetry("0"),
        max_batch_frames=16,
        retention_s=lambda stream_id: 0.0,
        **pause_settings,
    )


def _open_streams_with_frames_queued(engine: Engine, queues: IngestQueues, frames, num_queued: int) -> None:
    """Opens ``STREAMS`` with 8 frames of history each to ask about, and queues ``num_queued`` more of each."""
    for stream_id in STREAMS:
        engine.open_stream(stream_id, fps=4.0)
        feed(engine, stream_id, frames[:8])
        queues.add_stream(stream_id, 4.0)
    for t, rgb in frames[8 : 8 + num_queued]:
        for stream_id in STREAMS:
            queues.put(QueuedFrame(stream_id, t, rgb, time.monotonic()))


@pytest.mark.parametrize("in_the_call", [True, False])
@pytest.mark.parametrize(
    ("pause_layers", "skip_idle", "answered_inside_the_call"), [(2, False, True), (2, True, True), (0, False, False)]
)
def test_a_question_arriving_during_an_ingest_call_starts_at_a_pause_or_as_the_call_starts(
    tiny_model, bikes_frames, pause_layers, skip_idle, answered_inside_the_call, in_the_call
):
    engine = Engine(tiny_model, SMALL)
    queues = QuestionOnSecondCall(64, in_the_call=in_the_call)
    watched = EngineWatchingAQuestion(engine, queues)
    publisher = MetadataPublisher(InMemoryMetadataStore(), "0", lambda: WorkerView({}, {}))
    loop = _loop(
        watched,
        queues,
        TierSync(engine, publisher, "0"),
        ingest_pause_layers=pause_layers,
        ingest_pause_frames=4,
        ingest_pause_skip_idle=skip_idle,
    )
    queues.loop = loop
    _open_streams_with_frames_queued(engine, queues, bikes_frames, 8)
    loop.start()
    try:
        deadline = time.monotonic() + 60
        while queues.job is None or not watched.token_before_call_ended:
            assert time.monotonic() < deadline, "the loop never ran a second ingest call"
            time.sleep(0.01)
        events = []
        while (item := queues.job.events.get(timeout=60)) is not DONE:
            events.append(item)
        while loop.telemetry.totals("cam-0").ingested < 8:  # one frame of each camera a call
            assert time.monotonic() < deadline, "the loop did not ingest every queued frame"
            time.sleep(0.01)
    finally:
        loop.stop()
    assert watched.token_before_call_ended == [answered_inside_the_call]
    # As the call's frames are taken, a question starts before they are prepared (the chance at the call's start).
    assert watched.token_before_call_started == [answered_inside_the_call and not in_the_call]
    assert isinstance(events[0], TokenEvent) and len([e for e in events if isinstance(e, TokenEvent)]) == 3
    # The answer says how long the question waited for the engine: until a pause, or until the call ended.
    waited_s, call_left_s = events[-1].timings.start_wait_s, watched.question_call_ended_s - queues.job.submitted_s
    assert waited_s > 0 and (waited_s < call_left_s) is answered_inside_the_call, (waited_s, call_left_s)
    assert loop.telemetry.totals("cam-0").ingested == 8


class EngineAskingAfterItsCall:
    """The real engine; as its second ingest call returns, after every pause of it, a question comes."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.loop: EngineLoop | None = None
        self.job: QuestionJob | None = None
        self.num_calls = 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def ingest(self, frames, **options):
        result = self._engine.ingest(frames, **options)
        self.num_calls += 1
        if self.num_calls == 2:
            self.job = self.loop.questions.submit(
                QuestionJob("q", "cam-0", "what happened?", 3, None, time.monotonic() + 60)
            )
        return result


class TierSyncNotingTheQuestion(TierSync):
    """The real tier sync, noting at the first flush after the question came whether it had its first token."""

    def __init__(self, engine, publisher, worker_id, asking: EngineAskingAfterItsCall) -> None:
        super().__init__(engine, publisher, worker_id)
        self._asking = asking
        self.token_before_upkeep: list[bool] = []

    def flush(self, stream_ids) -> None:
        if self._asking.job is not None and not self.token_before_upkeep:
            self.token_before_upkeep.append(not self._asking.job.events.empty())
        super().flush(stream_ids)


@pytest.mark.parametrize(("pause_layers", "started_before_upkeep"), [(2, True), (0, False)])
def test_a_question_arriving_after_the_last_pause_starts_before_the_calls_upkeep(
    tiny_model, bikes_frames, pause_layers, started_before_upkeep
):
    engine = Engine(tiny_model, SMALL)
    asking = EngineAskingAfterItsCall(engine)
    publisher = MetadataPublisher(InMemoryMetadataStore(), "0", lambda: WorkerView({}, {}))
    tier_sync = TierSyncNotingTheQuestion(engine, publisher, "0", asking)
    queues = IngestQueues(64)
    loop = _loop(asking, queues, tier_sync, ingest_pause_layers=pause_layers)
    asking.loop = loop
    _open_streams_with_frames_queued(engine, queues, bikes_frames, 4)
    loop.start()
    try:
        deadline = time.monotonic() + 60
        while not tier_sync.token_before_upkeep:
            assert time.monotonic() < deadline, "the loop never flushed after a second ingest call"
            time.sleep(0.01)
        events = []
        while (item := asking.job.events.get(timeout=60)) is not DONE:
            events.append(item)
    finally:
        loop.stop()
    assert tier_sync.token_before_upkeep == [started_before_upkeep]
    assert len([e for e in events if isinstance(e, TokenEvent)]) == 3
    # Every gap between two chances to start a question is recorded, named by its ends.
    gaps = {
        between
        for between, _ in loop.telemetry.drain(queue_depths={}, lags_s={}, engine_stats=None).question_start_gaps
    }
    expected = {"call_start_to_pause", "pause_to_pause", "pause_to_call_end", "call_end_to_loop"}
    expected = expected if pause_layers else {"loop_to_loop"}
    assert expected <= gaps, gaps
    assert pause_layers or not any("pause" in g or "call_" in g for g in gaps), gaps


class EngineAskedTwice:
    """The real engine; as the loop asks it its first question, inside an ingest call, a second one comes. Notes how
    many of the call's pauses had passed at each ask."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.loop: EngineLoop | None = None
        self.first: QuestionJob | None = None
        self.second: QuestionJob | None = None
        self.pauses = 0  # of every ingest call so far
        self.pauses_at_ask: list[int] = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def ingest(self, frames, **options):
        if self.first is None and self.loop is not None:
            self.first = self.loop.questions.submit(
                QuestionJob("q1", "cam-0", "what happened?", 3, None, time.monotonic() + 60)
            )
        return self._engine.ingest(frames, **options)

    def ask(self, stream_id, question, **options):
        self.pauses_at_ask.append(self.pauses)
        if self.second is None:
            self.second = self.loop.questions.submit(
                QuestionJob("q2", "cam-1", "and then?", 3, None, time.monotonic() + 60)
            )
        return self._engine.ask(stream_id, question, **options)


def test_a_question_arriving_during_another_ones_prefill_starts_at_the_same_pause(
    tiny_model, bikes_frames, monkeypatch
):
    engine = Engine(tiny_model, SMALL)
    asked = EngineAskedTwice(engine)
    original_pause = IngestPauses.pause

    def counted(pauses, device, **where):
        asked.pauses += 1
        return original_pause(pauses, device, **where)

    monkeypatch.setattr(IngestPauses, "pause", counted)
    publisher = MetadataPublisher(InMemoryMetadataStore(), "0", lambda: WorkerView({}, {}))
    queues = IngestQueues(64)
    loop = _loop(asked, queues, TierSync(engine, publisher, "0"), ingest_pause_layers=2)
    _open_streams_with_frames_queued(engine, queues, bikes_frames, 4)
    asked.loop = loop  # from here on, the next ingest call brings the first question
    loop.start()
    try:
        deadline = time.monotonic() + 60
        while asked.second is None or len(asked.pauses_at_ask) < 2:
            assert time.monotonic() < deadline, "the loop never asked both questions"
            time.sleep(0.01)
        for job in (asked.first, asked.second):
            while (item := job.events.get(timeout=60)) is not DONE:
                assert not isinstance(item, Exception), item
    finally:
        loop.stop()
    first, second = asked.pauses_at_ask[:2]
    assert first > 0, "the first question started before the call's first pause, not at a pause"
    assert second == first, f"the second question started {second - first} pauses after the first"
