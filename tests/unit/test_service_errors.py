"""A worker's error reaches the router wrapped by Ray: unwrapped to its own gRPC status, and a bug's incident log
carries the worker's traceback, which Ray passes only as text."""

from __future__ import annotations

import logging
import pickle

import grpc
import pytest

from mosaic_core.errors import InvalidArgumentError, MosaicError
from services.errors import QueueFullError, status_for, unwrap

WORKER_TRACEBACK = 'Traceback (most recent call last):\n  File "mosaic_core/memory/arena.py", line 209, in write\n'


def _wrapped(cause: BaseException):
    ray_exceptions = pytest.importorskip("ray.exceptions")
    return ray_exceptions.RayTaskError("answer", WORKER_TRACEBACK, cause).as_instanceof_cause()


def test_a_bug_in_the_worker_is_internal_and_its_incident_log_has_the_workers_traceback(caplog):
    exc = unwrap(_wrapped(RuntimeError("Inplace update to inference tensor")))
    assert type(exc) is RuntimeError
    with caplog.at_level(logging.ERROR, logger="services.errors"):
        status = status_for(exc)
    assert status.code is grpc.StatusCode.INTERNAL
    assert "in the worker:" in caplog.text and 'arena.py", line 209' in caplog.text


def test_a_typed_error_keeps_its_code_and_gets_no_note():
    exc = unwrap(_wrapped(InvalidArgumentError("bad frame")))
    assert type(exc) is InvalidArgumentError and not getattr(exc, "__notes__", [])
    assert status_for(exc).code is grpc.StatusCode.INVALID_ARGUMENT


def test_a_full_queue_refusal_crosses_ray_with_its_retry_hint():
    """A worker's refusal is pickled on its way to the router (Ray carries a task's exception by pickling it); it must
    come out whole, or the router sees an exception it cannot rebuild and answers INTERNAL."""
    exc = pickle.loads(pickle.dumps(QueueFullError("stream 'a' already has 4 questions", retry_after_s=0.5)))
    assert type(exc) is QueueFullError and exc.retry_after_s == 0.5
    status = status_for(exc)
    assert status.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "already has 4 questions" in status.message
    assert dict(status.trailing_metadata)["retry-after-ms"] == "500"


def test_every_typed_error_built_from_a_sentence_crosses_ray_whole():
    """The other typed errors take only their sentence, which pickling keeps."""
    import mosaic_core.errors as core_errors
    import services.errors as service_errors

    classes = {
        cls
        for module in (core_errors, service_errors)
        for cls in vars(module).values()
        if isinstance(cls, type) and issubclass(cls, MosaicError) and cls is not QueueFullError
    }
    assert len(classes) > 5
    for cls in classes:
        exc = pickle.loads(pickle.dumps(cls("a sentence")))
        assert type(exc) is cls and str(exc) == "a sentence"


@pytest.mark.parametrize(
    ("error", "sentence"),
    [
        ("TimeoutError", "The metadata store (Redis) did not answer in time; retry shortly."),
        ("ConnectionError", "The metadata store (Redis) cannot be reached; retry shortly."),
    ],
)
def test_a_redis_that_does_not_answer_is_unavailable_with_a_sentence_also_from_a_worker(error, sentence):
    """Redis's own text (host, port, socket) stays in the server log; a worker's, wrapped by Ray, says the same."""
    exceptions = pytest.importorskip("redis.exceptions")
    exc = getattr(exceptions, error)("Timeout reading from 10.0.0.7:6379")
    for raised in (exc, _wrapped(exc)):
        status = status_for(unwrap(raised))
        assert (status.code, status.message) == (grpc.StatusCode.UNAVAILABLE, sentence)
