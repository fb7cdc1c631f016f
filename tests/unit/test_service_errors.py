"""A worker's error reaches the router wrapped by Ray: unwrapped to its own gRPC status, and a bug's incident log
carries the worker's traceback, which Ray passes only as text."""

from __future__ import annotations

import logging

import grpc
import pytest

from mosaic_core.errors import InvalidArgumentError
from services.errors import status_for, unwrap

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
