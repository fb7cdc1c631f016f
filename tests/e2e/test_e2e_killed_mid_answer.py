"""A worker process killed (SIGKILL, by its PID) while it answers: the client gets UNAVAILABLE with a sentence within
seconds, a question over several streams fails then too rather than after the other answers end, nothing is left
held in the router (its question queue; ``mosaic_queries_running`` back to 0), and once Ray has restarted the worker
its streams answer again.

Real local Ray (the e2e suite's one cluster), the real gRPC server with two workers of this module's own (each killed
once, well within Ray's restarts), tiny preset on the CPU. Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
from service_support import clip_frames, metric, wait_for, wait_ingested

from services.gen.mosaic.v1 import mosaic_pb2 as pb

FPS = 2.0
# Greedy answers of random weights may end at once; an attempt whose answer ended before the kill asks another.
# Two at most: each attempt kills a worker, and Ray restarts one only MAX_RESTARTS (3) times.
QUESTIONS = ("Describe everything.", "List every moving thing, in order.")
MAX_NEW_TOKENS = 512  # seconds of decoding on the CPU: the kill comes long before such an answer ends
FAILED_WITHIN_S = 15.0  # from the kill to the client's status (about 3 s measured on a 2-core machine)


@pytest.fixture(scope="module")
def server(ray_cluster):
    """A two-worker server with stream ``km-0`` on worker 0 and ``km-1`` on worker 1, each with frames."""
    from services.client import MosaicClient
    from services.config import load_config
    from services.embedded import ServerThread

    config = load_config(
        None, host="127.0.0.1", grpc_port=0, metrics_port=0, workers=2, worker_cpus=0.5, ingest_headroom=0.0,
        telemetry_interval_s=0.25, shutdown_grace_s=0.5, shutdown_drain_s=0.1,
        engine={"target_tokens_per_frame": 16, "local_window_tokens": 64, "retrieval_budget_tokens": 128},
    )  # fmt: skip
    server = ServerThread(config).start(timeout_s=400)
    try:
        with MosaicClient(server.target) as client:
            for worker in range(2):
                assert client.create_stream(f"km-{worker}", fps=FPS).worker_id == str(worker)
            frames = clip_frames("bikes.mp4", fps=FPS, num_frames=8, step=4)
            for worker in range(2):
                client.push_frames([(f"km-{worker}", t, rgb) for t, rgb in frames], timeout_s=60)
                wait_ingested(client, f"km-{worker}", len(frames))
            server.client = client
            yield server
    finally:
        server.stop()


def _pid(server, worker: int) -> int:
    """The worker's process as the router last heard it (0 while it does not answer)."""
    return int(metric(server.metrics_url, "mosaic_worker_pid", worker=str(worker)))


def _kill_when(server, stream_ids: list[str], victim_of) -> tuple[list[pb.QueryEvent], grpc.RpcError | None, float]:
    """Asks about ``stream_ids``, and on the first token kills the worker ``victim_of(events so far)`` names; returns
    the events, the call's error and the seconds from the kill to the call's end, once the worker is back."""
    for question in QUESTIONS:
        request = pb.QueryRequest(stream_ids=stream_ids, question=question, max_new_tokens=MAX_NEW_TOKENS)
        call = server.client.stub.Query(request, timeout=120, metadata=server.client.metadata)
        events, killed_s, error = [], None, None
        try:
            for event in call:
                events.append(event)
                if killed_s is None and event.token.token_ids:
                    assert metric(server.metrics_url, "mosaic_queries_running") == 1
                    victim = victim_of(events)
                    pid = wait_for(lambda v=victim: _pid(server, v), timeout_s=60, what=f"worker {victim}'s pid")
                    os.kill(pid, signal.SIGKILL)
                    killed_s = time.monotonic()
        except grpc.RpcError as err:
            error = err
        if killed_s is None:
            continue  # no token came: the answer ended at once
        took_s = time.monotonic() - killed_s
        wait_for(lambda v=victim, p=pid: _pid(server, v) not in (0, p), timeout_s=180, what=f"worker {victim} back")
        if error is not None:
            return events, error, took_s
        # Answered: it ended (an end token) before the kill reached it, or it went on regardless; ask another.
    pytest.fail("no question failed when its worker was killed mid-answer")


def _nothing_held(server) -> None:
    queue = server.server.servicer.queue
    wait_for(lambda: queue.num_running == 0 and queue.num_waiting == 0, timeout_s=10, what="the router's queue empty")
    assert metric(server.metrics_url, "mosaic_query_queue_depth") == 0
    assert metric(server.metrics_url, "mosaic_queries_running") == 0


def test_a_question_whose_worker_is_killed_mid_answer_is_unavailable_within_seconds(server):
    _, error, took_s = _kill_when(server, ["km-0"], lambda events: 0)
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    assert "worker 0 is unavailable" in error.details() and "retry shortly" in error.details()
    assert took_s < FAILED_WITHIN_S
    _nothing_held(server)
    assert server.client.ask("What moved?", ["km-0"], max_new_tokens=2, timeout_s=60).timings is not None


def test_a_question_over_two_workers_fails_when_one_is_killed_not_after_the_other_answer_ends(server):
    """The stream answering live is not the killed one: its answer is cut short, without the newline that ends it."""

    def the_other(events) -> int:
        live = next(e.token.text for e in events if e.token.text.startswith("["))  # "[km-0] ": its header
        return 1 if live == "[km-0] " else 0

    events, error, took_s = _kill_when(server, ["km-0", "km-1"], the_other)
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    assert "\n" not in "".join(e.token.text for e in events), "the failure waited for the live answer to end"
    assert took_s < FAILED_WITHIN_S
    _nothing_held(server)
    assert server.client.ask("What moved?", ["km-0", "km-1"], max_new_tokens=2, timeout_s=60).timings is not None
