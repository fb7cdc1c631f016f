"""A worker's answers run on threads of their own, apart from its other calls, and an answer that waits for one of
them still keeps its caller's deadline and cancel.

One worker actor (real Ray, real Redis, the tiny preset) with two answer threads, asked the way the router asks
(``send_ask``), more often than it has answer threads and than it has threads for everything else.
"""

from __future__ import annotations

import time
import uuid

import pytest
from service_support import wait_started

from mosaic_core.config import MIB
from services.config import ServiceConfig, load_config
from services.errors import DeadlineError, QuestionCancelled
from services.metadata import StreamRecord
from services.worker_actor import CONTROL_THREADS, send_ask, worker_actor

ray = pytest.importorskip("ray")

STREAMS = ("t-a", "t-b", "t-c", "t-d")
FPS = 2.0
ANSWER_THREADS = 2
LONG_ANSWER_TOKENS = 512  # the engine's limit: on this CPU far longer than any budget below


@pytest.fixture(scope="module")
def worker(ray_cluster, redis_server, bikes_frames, tmp_path_factory):
    config = load_config(
        None,
        redis_url=redis_server.url,
        redis_namespace=f"threads-{uuid.uuid4().hex[:8]}",
        data_dir=str(tmp_path_factory.mktemp("threads-history")),
        worker_cpus=0.5,
        answer_threads=ANSWER_THREADS,
        ingest_headroom=0.0,
        device_budget_bytes=64 * MIB,  # room for every question's 512-token answer
        engine={"target_tokens_per_frame": 16, "local_window_tokens": 64, "retrieval_budget_tokens": 128},
    )
    actor = worker_actor(config).remote("threads", config)
    wait_started(actor)
    for stream_id in STREAMS:
        ray.get(actor.open_stream.remote(StreamRecord(stream_id=stream_id, fps=FPS)), timeout=60)
    pairs = [(stream_id, t) for stream_id in STREAMS for t in range(2)]
    frames = [(i, stream_id, t / FPS, bikes_frames[t][1]) for i, (stream_id, t) in enumerate(pairs)]
    assert ray.get(actor.push.remote(frames), timeout=60).accepted == len(frames)
    deadline = time.monotonic() + 120
    while not all(info.frames_ingested >= 2 for info in ray.get(actor.stream_infos.remote(), timeout=60)):
        assert time.monotonic() < deadline, "the frames were not ingested"
        time.sleep(0.2)
    yield actor
    ray.get(actor.shutdown.remote(), timeout=60)
    ray.kill(actor)


def _ask(worker, question_id: str, stream_id: str, timeout_s: float):
    return send_ask(worker, question_id, stream_id, "What happens?", LONG_ANSWER_TOKENS, None, timeout_s)


def _ends(asks, started_s: float) -> list[tuple[str, float]]:
    """How each ask ended ("ok" or the error's class name) and when, seconds after ``started_s``."""
    ends = []
    for refs in asks:
        try:
            for ref in refs:
                ray.get(ref, timeout=120)
            outcome = "ok"
        except ray.exceptions.RayTaskError as err:
            outcome = type(err.cause).__name__
        ends.append((outcome, time.monotonic() - started_s))
    return ends


def test_calls_other_than_answers_are_not_held_up_by_them(worker, bikes_frames):
    """More answers than the worker has threads for anything else: telemetry, stream infos and frames still answer
    at once (the router's telemetry poll gives up after 5 s and would call the worker gone)."""
    budget_s = 4.0
    num_asks = len(STREAMS) * ServiceConfig().max_questions_per_stream  # every ask the worker takes at once
    assert num_asks > CONTROL_THREADS + ServiceConfig().query_concurrency  # more than the threads of all its calls
    started_s = time.monotonic()
    asks = [_ask(worker, f"control-{n}", STREAMS[n % len(STREAMS)], budget_s) for n in range(num_asks)]
    time.sleep(0.5)  # the answers hold their threads, the rest wait for one
    waits = {}
    for name, call in (
        ("telemetry", lambda: worker.drain_telemetry.remote()),
        ("stream infos", lambda: worker.stream_infos.remote()),
        ("frames", lambda: worker.push.remote([(0, STREAMS[0], 2 / FPS, bikes_frames[2][1])])),
    ):
        sent_s = time.monotonic()
        ray.get(call(), timeout=60)
        waits[name] = time.monotonic() - sent_s
    ends = _ends(asks, started_s)
    assert max(waits.values()) < 2.0, f"calls waited behind {num_asks} answers: {waits}"
    assert {outcome for outcome, _ in ends} <= {"ok", DeadlineError.__name__}, ends


def test_an_answer_that_waited_for_a_thread_ends_by_its_callers_deadline(worker):
    """The deadline counts from when the router sent the ask, not from when a thread took it; the worker's telemetry
    counts the wait (``mosaic_answer_thread_wait_seconds``)."""
    budget_s = 3.0
    ray.get(worker.drain_telemetry.remote(), timeout=60)
    started_s = time.monotonic()
    asks = [_ask(worker, f"deadline-{n}", STREAMS[n], budget_s) for n in range(ANSWER_THREADS + 1)]
    ends = _ends(asks, started_s)
    assert [outcome for outcome, _ in ends] == [DeadlineError.__name__] * len(asks), ends
    assert max(at for _, at in ends) < budget_s + 1.5, f"an answer outlived its caller's deadline: {ends}"
    waits_s = sorted(ray.get(worker.drain_telemetry.remote(), timeout=60).answer_thread_waits_s)
    assert len(waits_s) == len(asks), waits_s
    assert waits_s[0] < 1.0 and waits_s[-1] > budget_s - 1.0, f"the third ask's wait for a thread: {waits_s}"


def test_a_cancel_that_comes_before_its_ask_stops_the_answer(worker):
    """The router cancels an answer whose client went away; when that ask still waits for a thread, the worker has
    not seen it yet, and the cancel must still stop it once it comes."""
    started_s = time.monotonic()
    running = [_ask(worker, f"held-{n}", STREAMS[n], 60.0) for n in range(ANSWER_THREADS)]
    time.sleep(0.5)
    waiting = _ask(worker, "waiting", STREAMS[ANSWER_THREADS], 60.0)
    time.sleep(0.5)
    assert ray.get(worker.cancel.remote("waiting"), timeout=10) is False  # not on the worker yet
    assert all(ray.get([worker.cancel.remote(f"held-{n}") for n in range(ANSWER_THREADS)], timeout=10))
    ends = _ends([*running, waiting], started_s)
    assert [outcome for outcome, _ in ends] == [QuestionCancelled.__name__] * (ANSWER_THREADS + 1), ends
