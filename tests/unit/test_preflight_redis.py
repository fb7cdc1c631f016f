"""The start-up check's Redis sentences name the server but never its password: they go to stderr, so to pod logs."""

from __future__ import annotations

import socket

import pytest

from services.preflight import _redis_problem


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("userinfo", [":hunter2", "admin:hunter2"])
def test_a_redis_that_does_not_answer_is_named_without_its_password(userinfo):
    port = _closed_port()
    problem = _redis_problem(f"redis://{userinfo}@127.0.0.1:{port}/0")
    assert problem is not None and "hunter2" not in problem, problem
    assert f"redis://***@127.0.0.1:{port}/0" in problem


def test_a_url_that_is_not_redis_is_named_without_its_password():
    problem = _redis_problem("http://:hunter2@127.0.0.1:1/0")
    assert problem is not None and "hunter2" not in problem and "not a Redis URL" in problem, problem
