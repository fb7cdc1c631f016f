"""The engine loop with ``encode_ahead``: as an ingest call returns, the next call's frames are taken and their vision
tower queued, and that call uses it; the clusters come out as without it, and frames taken ahead of a stream that
closes are dropped (the worker counts them as deleted with the stream) and never reach a stream opened again under
its id. Real engine (tiny preset on CPU),
real loop and queues."""

from __future__ import annotations

import time

import pytest

from mosaic_core.engine.engine import Engine
from services.engine_loop import EngineLoop
from services.ingest_queue import IngestQueues, PutOutcome, QueuedFrame
from services.metadata import InMemoryMetadataStore
from services.publisher import MetadataPublisher, WorkerView
from services.question_job import QuestionJob
from services.telemetry import WorkerTelemetry
from services.tier_sync import TierSync
from tests.engine.engine_helpers import SMALL

STREAMS = ("cam-0", "cam-1")
QUEUED = 6  # frames of each stream: six calls of one frame a stream


class EngineNotingCalls:
    """The real engine, noting each ingest call's result and each batch encoded ahead."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.results = []
        self.encoded_ahead = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def ingest(self, frames, **options):
        self.results.append(self._engine.ingest(frames, **options))
        return self.results[-1]

    def encode_ahead(self, frames, **options):
        self.encoded_ahead.append([(f.stream_id, f.timestamp_s) for f in frames])
        return self._engine.encode_ahead(frames, **options)


def _loop_with_frames(
    engine, bikes_frames, num_frames: int, queue_frames: int = 64, **options
) -> tuple[EngineLoop, IngestQueues]:
    """A real loop over ``engine`` (not started), a call of one frame a stream, with ``STREAMS`` open and
    ``num_frames`` frames of each queued (of at most ``queue_frames``)."""
    queues = IngestQueues(queue_frames)
    publisher = MetadataPublisher(InMemoryMetadataStore(), "0", lambda: WorkerView({}, {}))
    loop = EngineLoop(
        engine,
        queues,
        TierSync(engine, publisher, "0"),
        WorkerTelemetry("0"),
        max_batch_frames=len(STREAMS),
        retention_s=lambda stream_id: 0.0,
        **options,
    )
    for stream_id in STREAMS:
        engine.open_stream(stream_id, fps=4.0)
        queues.add_stream(stream_id, 4.0)
    for t, rgb in bikes_frames[:num_frames]:
        for stream_id in STREAMS:
            queues.put(QueuedFrame(stream_id, t, rgb, time.monotonic()))
    return loop, queues


def _run(tiny_model, bikes_frames, *, encode_ahead: bool):
    engine = EngineNotingCalls(Engine(tiny_model, SMALL))
    loop, _ = _loop_with_frames(engine, bikes_frames, QUEUED, encode_ahead=encode_ahead)
    loop.start()
    try:
        deadline = time.monotonic() + 60
        while any(loop.telemetry.totals(s).ingested < QUEUED for s in STREAMS):
            assert time.monotonic() < deadline, "the loop did not ingest every queued frame"
            time.sleep(0.01)
    finally:
        loop.stop()
    clusters = {s: [(c.cluster_id, c.start_s, c.end_s, c.num_tokens) for c in engine.clusters(s)] for s in STREAMS}
    engine.calls_counted_ahead = loop.telemetry.drain(queue_depths={}, lags_s={}, engine_stats=None).calls_encoded_ahead
    return engine, clusters


def test_each_call_after_the_first_uses_the_tower_queued_as_the_call_before_returned(tiny_model, bikes_frames):
    engine, clusters = _run(tiny_model, bikes_frames, encode_ahead=True)
    assert [r.num_frames for r in engine.results] == [len(STREAMS)] * QUEUED
    assert [r.encoded_ahead for r in engine.results] == [False] + [True] * (QUEUED - 1)
    assert engine.calls_counted_ahead == QUEUED - 1  # what /metrics' mosaic_ingest_calls_encoded_ahead_total adds
    times = [t for t, _ in bikes_frames[1:QUEUED]]
    assert engine.encoded_ahead == [[(s, t) for s in STREAMS] for t in times]
    _, plain = _run(tiny_model, bikes_frames, encode_ahead=False)
    assert clusters == plain and all(clusters.values())


@pytest.mark.parametrize("reopened", [False, True])
def test_frames_taken_ahead_of_a_closing_stream_are_dropped(tiny_model, bikes_frames, reopened):
    engine = Engine(tiny_model, SMALL)
    loop, queues = _loop_with_frames(engine, bikes_frames, 2, encode_ahead=True)
    # the loop's own step, on this thread: the first call, and the second's frames ahead
    assert loop.ingest_calls.ingest_once()
    lag_s = loop.ingest_calls.oldest_wait_s("cam-1")
    assert queues.oldest_wait_s("cam-1") == 0.0 and lag_s > 0.0  # the lag counts them
    assert loop.ingest_calls.drop_ahead("cam-1") == 1
    assert loop.ingest_calls.drop_ahead("cam-1") == 0
    engine.close_stream("cam-1")
    if reopened:
        engine.open_stream("cam-1", fps=4.0)
    assert loop.ingest_calls.ingest_once()  # the frames left: cam-0's
    assert not loop.ingest_calls.ingest_once()  # nothing queued, nothing ahead
    assert engine.stream_stats("cam-0").frames_ingested == 2
    if reopened:
        assert engine.stream_stats("cam-1").frames_ingested == 0


def test_answers_stop_decoding_after_their_slice_for_frames_taken_ahead(tiny_model, bikes_frames):
    engine = Engine(tiny_model, SMALL)
    loop, queues = _loop_with_frames(engine, bikes_frames, 2, answer_slice_s=0.0, encode_ahead=True)
    assert loop.ingest_calls.ingest_once() and queues.total_frames() == 0  # the second call's frames are taken ahead
    loop.questions.submit(QuestionJob("q", "cam-0", "what happened?", 16, None, time.monotonic() + 60))
    assert loop.questions.start_questions()
    assert loop._step_questions()
    assert loop.questions.has_running(), "the answer went on decoding to its end while the next call's frames waited"


class EngineAskedWhileEncodingAhead(EngineNotingCalls):
    """The real engine; as the loop first encodes a batch ahead, a question comes. Notes whether it had its first
    token by the time the encoding returned."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.loop: EngineLoop | None = None
        self.job: QuestionJob | None = None
        self.answered_while_encoding: bool | None = None

    def encode_ahead(self, frames, **options):
        if self.job is not None:
            return super().encode_ahead(frames, **options)
        self.job = self.loop.questions.submit(
            QuestionJob("q", "cam-0", "what happened?", 2, None, time.monotonic() + 60)
        )
        encoded = super().encode_ahead(frames, **options)
        self.answered_while_encoding = not self.job.events.empty()
        return encoded


def test_a_question_arriving_while_the_next_tower_is_queued_starts_at_its_pauses(tiny_model, bikes_frames):
    engine = EngineAskedWhileEncodingAhead(Engine(tiny_model, SMALL))
    loop, _ = _loop_with_frames(engine, bikes_frames, 2, ingest_pause_blocks=1, encode_ahead=True)
    engine.loop = loop
    # the first call, then the second's tower queued ahead, with the question's pauses
    assert loop.ingest_calls.ingest_once()
    assert engine.answered_while_encoding is True


def test_frames_taken_ahead_count_against_their_queue_until_their_call_begins(tiny_model, bikes_frames):
    """Taken ahead, a frame has left its queue one upkeep before a call would take it; it still counts against the
    queue's bound until then, so a full queue drops its oldest frame as it would without ``encode_ahead``."""
    engine = Engine(tiny_model, SMALL)
    loop, queues = _loop_with_frames(engine, bikes_frames, 3, queue_frames=3, encode_ahead=True)

    def put(i: int) -> PutOutcome:
        t, rgb = bikes_frames[i]
        return queues.put(QueuedFrame("cam-0", t, rgb, time.monotonic()))

    assert loop.ingest_calls.ingest_once()  # frame 0 ingested, frame 1 taken ahead, frame 2 queued
    assert put(3) is PutOutcome.QUEUED
    assert put(4) is PutOutcome.QUEUED_DROPPED_OLDEST  # 2 queued and 1 taken ahead: full
    assert loop.ingest_calls.ingest_once()  # frame 1 ingested, frame 3 taken ahead, frame 4 queued
    assert put(5) is PutOutcome.QUEUED  # frame 1's place was given back as its call began
    assert put(6) is PutOutcome.QUEUED_DROPPED_OLDEST


def test_a_queue_depth_counts_the_frames_taken_ahead(tiny_model, bikes_frames):
    engine = Engine(tiny_model, SMALL)
    loop, queues = _loop_with_frames(engine, bikes_frames, 3, encode_ahead=True)
    assert loop.ingest_calls.ingest_once()  # frame 0 ingested, frame 1 taken ahead, frame 2 queued
    assert queues.depth("cam-0") == 2 and queues.depths() == {"cam-0": 2, "cam-1": 2}


def test_encode_ahead_is_refused_with_queues_no_longer_than_a_call_takes_of_a_stream(tiny_model, bikes_frames):
    engine = Engine(tiny_model, SMALL)
    with pytest.raises(ValueError, match="ingest_queue_frames=1, max_frames_per_pass=1"):
        _loop_with_frames(engine, bikes_frames, 0, queue_frames=1, encode_ahead=True)
    _loop_with_frames(Engine(tiny_model, SMALL), bikes_frames, 0, queue_frames=1, encode_ahead=False)


def test_ending_ingest_takes_in_what_waits_then_ingests_nothing_more(tiny_model, bikes_frames):
    engine = Engine(tiny_model, SMALL)
    loop, queues = _loop_with_frames(engine, bikes_frames, 3, encode_ahead=True)
    assert loop.ingest_calls.end_ingest(time.monotonic() + 60) == {}
    assert [engine.stream_stats(s).frames_ingested for s in STREAMS] == [3, 3]
    t, rgb = bikes_frames[3]
    queues.put(QueuedFrame("cam-0", t, rgb, time.monotonic()))
    loop.start()
    try:
        time.sleep(0.3)
        loop.call(lambda: None)  # the loop has been round since the frame came
    finally:
        loop.stop()
    assert engine.stream_stats("cam-0").frames_ingested == 3


def test_ending_ingest_past_its_deadline_returns_the_frames_queued_and_taken_ahead(tiny_model, bikes_frames):
    engine = Engine(tiny_model, SMALL)
    loop, queues = _loop_with_frames(engine, bikes_frames, 3, encode_ahead=True)
    assert loop.ingest_calls.ingest_once()  # frame 0 ingested, frame 1 taken ahead, frame 2 queued
    assert loop.ingest_calls.end_ingest(time.monotonic()) == {"cam-0": 2, "cam-1": 2}
    assert queues.depths() == {"cam-0": 0, "cam-1": 0} and loop.ingest_calls.oldest_wait_s("cam-0") == 0.0
    assert [engine.stream_stats(s).frames_ingested for s in STREAMS] == [1, 1]


def test_a_cpu_worker_leaves_encode_ahead_off_though_the_service_turns_it_on(tiny_model, tmp_path):
    """On by default with the engine's tower stream; a CPU worker leaves it off, since its tower would only run
    before the questions, beside nothing."""
    from services.config import load_config
    from services.worker import WorkerCore

    config = load_config(None, data_dir=str(tmp_path))
    assert config.encode_ahead and config.engine_config().tower_stream
    assert not load_config(None, engine={"tower_stream": False}).engine_config().tower_stream
    worker = WorkerCore(
        "0", config, store=InMemoryMetadataStore(), engine=Engine(tiny_model, config.engine_config())
    ).wait_started(60)
    try:
        assert worker.loop.ingest_calls.encode_ahead is False
    finally:
        worker.shutdown()
