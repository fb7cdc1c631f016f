"""Real faults against a real local service: a worker SIGKILL, a frozen Redis with a DeleteStream during the
freeze, Redis restarted empty, and the whole server restarted on the same data directory.

``services.bench_faults`` runs ``redis-server`` and ``mosaic serve`` as child processes (real Ray, real gRPC),
kills them by PID, and compares the sealed clusters in the worker's manifests before and after each fault.
One service runs the four faults in sequence; this module is the slowest in the suite (a few minutes).
"""

from __future__ import annotations

import shutil

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs Debian's redis-server"),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("ray")
    from services.bench_faults import run_faults

    return {result.key: result for result in run_faults(tmp_path_factory.mktemp("faults"), quick=True)}


def _check(result) -> None:
    assert result.before > 0, f"{result.fault}: nothing was sealed before the fault"
    assert result.lost == [], f"{result.fault}: sealed clusters lost: {result.lost}"
    assert result.after == result.before
    assert result.checks == [], f"{result.fault}: {result.checks}"


def test_a_killed_worker_comes_back_with_every_sealed_cluster(results):
    result = results["worker_kill"]
    _check(result)
    assert result.recovery_s is not None and result.recovery_s < 120


def test_a_frozen_redis_stalls_neither_questions_nor_ingest_and_a_delete_sticks(results):
    result = results["redis_freeze"]
    _check(result)
    assert result.recovery_s is not None and result.recovery_s < 10, "questions must not wait for Redis"


def test_redis_restarted_empty_is_repopulated_from_the_workers(results):
    result = results["redis_wipe"]
    _check(result)
    assert result.client_errors == {}


def test_a_restarted_server_re_adopts_history_and_forgets_deleted_streams(results):
    result = results["server_restart"]
    _check(result)
    assert result.recovery_s is not None
