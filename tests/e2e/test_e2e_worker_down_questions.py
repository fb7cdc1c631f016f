"""Questions whose worker stops answering or ends them itself, on a one-worker server of this module's own.

A worker process frozen by SIGSTOP (by its PID; SIGCONT in a ``finally``) is marked down by the router's telemetry
poll within seconds: the question it was answering ends then, UNAVAILABLE with a sentence naming the worker, not at
its deadline; a question asked while it is down ends at once, the same way; once it is resumed it answers again. A
question the worker itself ended (its own error) gets no cancel from the router afterwards: such a cancel found no
question and was kept in the worker's early-cancel map for an ask that never comes.

Real local Ray (the e2e suite's one cluster), the real gRPC server, tiny preset on the CPU. Every wait is bounded.
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
STREAM = "down-0"
# Greedy answers of random weights may end at once; an attempt whose answer ended before the freeze asks another.
QUESTIONS = ("Describe everything.", "List every moving thing, in order.", "Tell the whole story of this stream.")
MAX_NEW_TOKENS = 512  # seconds of decoding on the CPU: the freeze comes long before such an answer ends
DEADLINE_S = 120.0  # the client's: the answer must end long before it
ENDED_WITHIN_S = 20.0  # from the freeze to the client's status: two polls' 5 s timeouts, and their interval


@pytest.fixture(scope="module")
def server(ray_cluster):
    """A one-worker server with stream ``down-0`` and frames."""
    from services.client import MosaicClient
    from services.config import load_config
    from services.embedded import ServerThread

    config = load_config(
        None, host="127.0.0.1", grpc_port=0, metrics_port=0, workers=1, worker_cpus=0.5, ingest_headroom=0.0,
        telemetry_interval_s=0.25, shutdown_grace_s=0.5, shutdown_drain_s=0.1,
        engine={"target_tokens_per_frame": 16, "local_window_tokens": 64, "retrieval_budget_tokens": 128},
    )  # fmt: skip
    server = ServerThread(config).start(timeout_s=400)
    try:
        with MosaicClient(server.target) as client:
            client.create_stream(STREAM, fps=FPS)
            frames = clip_frames("bikes.mp4", fps=FPS, num_frames=8, step=4)
            client.push_frames([(STREAM, t, rgb) for t, rgb in frames], timeout_s=60)
            wait_ingested(client, STREAM, len(frames))
            server.client = client
            yield server
    finally:
        server.stop()


def _worker(server):
    return server.server.coordinator.workers[0]


def _early_cancels(server) -> set[str]:
    """The question ids the worker keeps cancels of, for asks that have not come (``WorkerQuestions.cancel``)."""
    import ray

    ref = _worker(server).__ray_call__.remote(lambda core: set(core.questions._early_cancels))
    return ray.get(ref, timeout=30)


def test_a_question_the_worker_ended_itself_gets_no_cancel(server):
    """The worker refuses a question longer than its token limit (512) after the router admitted it (the router
    counts characters only); the router then sent it a cancel, which the worker kept as an early cancel."""
    before = _early_cancels(server)
    question = "word " * 1500  # under the router's 8192 characters, over the engine's 512 tokens
    with pytest.raises(grpc.RpcError) as refused:
        server.client.ask(question, [STREAM], max_new_tokens=2, timeout_s=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert "tokens long" in refused.value.details()
    deadline = time.monotonic() + 3.0  # a cancel, were one sent, is taken within this
    while time.monotonic() < deadline:
        assert _early_cancels(server) <= before, "the router cancelled a question its worker had ended"
        time.sleep(0.2)


def test_a_question_on_a_frozen_worker_ends_unavailable_within_seconds_naming_it(server):
    pid = wait_for(lambda: int(metric(server.metrics_url, "mosaic_worker_pid", worker="0")), timeout_s=60,
                   what="worker 0's pid")  # fmt: skip
    queue = server.server.servicer.queue
    for question in QUESTIONS:
        request = pb.QueryRequest(stream_ids=[STREAM], question=question, max_new_tokens=MAX_NEW_TOKENS)
        call = server.client.stub.Query(request, timeout=DEADLINE_S, metadata=server.client.metadata)
        frozen_s = error = None
        try:
            try:
                for event in call:
                    if frozen_s is None and event.token.token_ids:
                        os.kill(pid, signal.SIGSTOP)
                        frozen_s = time.monotonic()
            except grpc.RpcError as err:
                error = err
            took_s = None if frozen_s is None else time.monotonic() - frozen_s
            if error is not None:
                # Asked while the worker is marked down: refused at once, not queued on it.
                started_s = time.monotonic()
                with pytest.raises(grpc.RpcError) as later:
                    server.client.ask("What moved?", [STREAM], max_new_tokens=2, timeout_s=60)
                later_s = time.monotonic() - started_s
        finally:
            if frozen_s is not None:
                os.kill(pid, signal.SIGCONT)
        if frozen_s is None:
            continue  # no token came: the answer ended at once; ask another
        assert error is not None, "the answer went on although its worker was frozen"
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert "worker 0 is unavailable" in error.details() and "retry shortly" in error.details()
        assert "stopped answering" in error.details() and repr(STREAM) in error.details()
        assert took_s < ENDED_WITHIN_S
        assert later.value.code() == grpc.StatusCode.UNAVAILABLE and later_s < 5.0, later.value.details()
        wait_for(lambda: queue.num_running == 0 and queue.num_waiting == 0, timeout_s=10, what="the queue empty")
        wait_for(lambda: 0 in server.server.coordinator.ready_workers, timeout_s=60, what="worker 0 back")
        assert server.client.ask("What moved?", [STREAM], max_new_tokens=2, timeout_s=60).timings is not None
        return
    pytest.fail("no answer produced a token to freeze its worker on")
