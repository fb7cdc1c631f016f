"""How a question ends, on the session server: counted truly (``mosaic_queries_total`` by outcome) when its client
went away while its answer was being sent or the stream's worker refused it, and with the right status when its
stream is deleted while it is answered."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from service_support import API_KEY, clip_frames, metric, wait_ingested

from services.gen.mosaic.v1 import mosaic_pb2 as pb
from services.worker_actor import send_ask

STREAM = "ends-stream"
METADATA = (("x-api-key", API_KEY),)


@pytest.fixture(scope="module")
def stream(client):
    client.create_stream(STREAM, fps=2.0)
    client.push_frames((STREAM, t, rgb) for t, rgb in clip_frames("bikes.mp4", fps=2.0, num_frames=6))
    wait_ingested(client, STREAM, 6)
    yield STREAM
    client.delete_stream(STREAM)


class _OpenCall:
    """The part of a grpc.aio servicer context ``Query`` reads, for a call with time left and no abort expected."""

    def time_remaining(self) -> float:
        return 60.0

    async def abort(self, code, details, trailing_metadata=()):
        raise AssertionError(f"the question was aborted: {code} {details}")


def test_a_question_closed_while_its_answer_is_sent_is_counted(service, stream):
    """grpc.aio closes a server-streaming handler at its ``yield`` when the client goes away while an answer is
    being sent to it; that question still counts, as cancelled (the client's choice), not as an error, which alerts
    and dashboards read as the server failing."""
    counts = {o: metric(service.metrics_url, "mosaic_queries_total", outcome=o) for o in ("error", "cancelled")}
    request = pb.QueryRequest(stream_ids=[stream], question="Describe everything.", max_new_tokens=64)

    async def read_two_events_then_close() -> None:
        call = service.server.servicer.Query(request, _OpenCall())
        await anext(call)
        await anext(call)
        await call.aclose()

    service.run(read_two_events_then_close())
    assert metric(service.metrics_url, "mosaic_queries_total", outcome="cancelled") == counts["cancelled"] + 1
    assert metric(service.metrics_url, "mosaic_queries_total", outcome="error") == counts["error"]
    assert metric(service.metrics_url, "mosaic_query_queue_depth") == 0


class _FarCall(_OpenCall):
    """A call whose deadline is centuries away, as a client may set (gRPC carries up to 99,999,999 hours)."""

    def time_remaining(self) -> float:
        return 1e10


def test_a_question_with_a_deadline_centuries_away_is_answered(service, stream):
    """A wait that long overflows the worker's thread waits (``threading.TIMEOUT_MAX``, about 292 years): the answer
    ended INTERNAL. A question ends by ``MAX_QUESTION_S`` whatever its deadline, as one with none does."""
    request = pb.QueryRequest(stream_ids=[stream], question="What moved?", max_new_tokens=2)

    async def ask() -> list:
        return [event async for event in service.server.servicer.Query(request, _FarCall())]

    events = service.run(ask())
    assert events[-1].WhichOneof("event") == "timings"


def test_a_question_the_worker_refuses_is_counted_rejected(client, service, stream):
    """The stream's worker takes ``max_questions_per_stream`` (4) questions of a stream; the next is refused with
    RESOURCE_EXHAUSTED, counted as rejected as the router's own full queue is, not as an error."""
    import ray

    coordinator = service.server.coordinator
    worker = coordinator.workers[coordinator.placement[stream]]
    request = pb.QueryRequest(stream_ids=[stream], question="And now?", max_new_tokens=2)
    refusal = None
    # Greedy answers of random weights: a question whose answer ends at once ends at once every time the stream is
    # as it was, so each attempt holds another question.
    questions = (
        "Describe everything.",
        "List every moving thing, in order.",
        "What did each camera see, and when?",
        "Tell the whole story of this stream.",
        "Name each colour seen, one by one.",
    )
    for attempt, question in enumerate(questions):
        ids = [f"held-{attempt}-{n}" for n in range(4)]
        held = [send_ask(worker, question_id, stream, question, 512, None, 60.0) for question_id in ids]
        deadline = time.monotonic() + 60  # each ask reaches the worker in its own time, the router's may come first
        while ray.get(worker.questions_of.remote(stream), timeout=30) < 4:
            assert time.monotonic() < deadline, "the four questions did not all reach the worker"
            time.sleep(0.05)
        rejected_before = metric(service.metrics_url, "mosaic_queries_total", outcome="rejected")
        errors_before = metric(service.metrics_url, "mosaic_queries_total", outcome="error")
        try:
            # The first one's first token: it is answering. The other three, sent before it to the worker's answer
            # threads, wait there for device room (this server's budget holds one such answer at a time).
            next(held[0], None)
            list(client.stub.Query(request, timeout=60, metadata=METADATA))
        except grpc.RpcError as err:
            refusal = err
        finally:
            ray.get([worker.cancel.remote(question_id) for question_id in ids], timeout=30)
            # The next attempt starts from none held: a cancelled answer still counts until it ends, and one left
            # over would take a slot of the next attempt's four (refused) and then end, letting its fifth through.
            deadline = time.monotonic() + 60
            while ray.get(worker.questions_of.remote(stream), timeout=30) > 0:
                assert time.monotonic() < deadline, "the cancelled questions did not end"
                time.sleep(0.05)
        if refusal is not None:
            break
        # Answered: the first held answer had already ended (random weights may stop at an early end token), so
        # the worker held three. Hold four again.
    assert refusal is not None, "a fifth question was never refused while four were held"
    assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "already has 4 questions" in refusal.details()
    assert metric(service.metrics_url, "mosaic_queries_total", outcome="rejected") == rejected_before + 1
    assert metric(service.metrics_url, "mosaic_queries_total", outcome="error") == errors_before


def test_a_question_cancelled_or_past_its_deadline_mid_answer_ends_on_its_worker(client, service, stream):
    """The worker stops decoding it and gives its place back (``questions_of`` back to 0, within seconds), and the
    router holds nothing of it; each is counted, as cancelled (not an error) and as a deadline."""
    import ray

    coordinator = service.server.coordinator
    worker = coordinator.workers[coordinator.placement[stream]]

    def ended_on_the_worker() -> None:
        deadline = time.monotonic() + 10
        while ray.get(worker.questions_of.remote(stream), timeout=30) > 0:
            assert time.monotonic() < deadline, "the worker went on with the question"
            time.sleep(0.05)
        assert service.server.servicer.queue.num_running == 0
        assert metric(service.metrics_url, "mosaic_queries_running") == 0

    outcomes = ("error", "deadline", "cancelled")
    counts = {o: metric(service.metrics_url, "mosaic_queries_total", outcome=o) for o in outcomes}
    request = pb.QueryRequest(stream_ids=[stream], question="Describe everything.", max_new_tokens=400)
    call = client.stub.Query(request, timeout=60, metadata=METADATA)
    for _, event in zip(range(3), call, strict=False):  # two tokens or so: it is answering
        assert event.WhichOneof("event") == "token"
    call.cancel()
    ended_on_the_worker()
    with pytest.raises(grpc.RpcError) as late:
        client.ask("Describe everything.", [stream], max_new_tokens=400, timeout_s=1.0)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline passed" in late.value.details()
    ended_on_the_worker()
    assert metric(service.metrics_url, "mosaic_queries_total", outcome="cancelled") == counts["cancelled"] + 1
    assert metric(service.metrics_url, "mosaic_queries_total", outcome="error") == counts["error"]
    assert metric(service.metrics_url, "mosaic_queries_total", outcome="deadline") == counts["deadline"] + 1


# Greedy answers of random weights may end at once; each attempt asks another question on a fresh stream.
LONG_QUESTIONS = ("Describe everything.", "List every moving thing, in order.", "Tell the whole story of this stream.")


def test_a_stream_deleted_mid_answer_ends_its_question_not_found_and_spares_the_other_streams(client, service, stream):
    """A question about a stream deleted while it is answered ends NOT_FOUND with a sentence, not CANCELLED (which
    tells a client it cancelled the call itself); a question over that stream and another one still answers, from the
    other stream."""
    import ray

    from services.client import QueryResult

    coordinator = service.server.coordinator
    for attempt, question in enumerate(LONG_QUESTIONS):
        doomed = f"ends-doomed-{attempt}"
        client.create_stream(doomed, fps=2.0)
        client.push_frames((doomed, t, rgb) for t, rgb in clip_frames("bikes.mp4", fps=2.0, num_frames=6))
        wait_ingested(client, doomed, 6)
        worker = coordinator.workers[coordinator.placement[doomed]]
        with ThreadPoolExecutor(2) as pool:
            alone, both = (
                pool.submit(_outcome, lambda ids=ids, q=question: client.ask(q, ids, max_new_tokens=128, timeout_s=60))
                for ids in ([doomed], [stream, doomed])
            )
            deadline = time.monotonic() + 60
            while ray.get(worker.questions_of.remote(doomed), timeout=30) < 2:  # both reached the worker
                assert time.monotonic() < deadline, "the two questions did not reach the stream's worker"
                time.sleep(0.02)
            client.delete_stream(doomed)
            (code, details, _), (both_code, both_details, answer) = alone.result(90), both.result(90)
        if code == "OK":
            continue  # its answer ended before the delete: ask again, another question on another stream
        assert (code, both_code) == ("NOT_FOUND", "OK"), (details, both_details)
        assert f"stream {doomed!r} was deleted" in details
        assert isinstance(answer, QueryResult) and f"[{stream}] " in answer.text
        assert {span.stream_id for span in answer.evidence} <= {stream}
        return
    pytest.fail("every answer ended before its stream was deleted")


def _outcome(call) -> tuple[str, str, object]:
    """``(code name, details, value)`` of a call: ``("OK", "", its value)`` when it succeeds."""
    try:
        return "OK", "", call()
    except grpc.RpcError as err:
        return err.code().name, err.details(), None
