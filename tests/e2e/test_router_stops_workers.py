"""A stopping router lets its workers make their streams durable side by side, each for what is left of the pod's
grace past the calls' grace, and says which ran out of time. Real Ray (the e2e suite's one cluster, so no second start)
and the real ``MosaicServer.stop``; the workers are actors whose shutdown takes a set time (building engines would
only slow the test)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from services import router
from services.config import load_config
from services.coordinator import Coordinator
from services.router import MosaicServer

ray = pytest.importorskip("ray")


def _slow_shutdown_actor():
    """An actor class that stands in for a worker: its shutdown takes ``shutdown_s``, then leaves ``done_path``
    behind. Defined in a function so that Ray ships it by value (Ray's workers cannot import this test module)."""

    class SlowShutdown:
        def __init__(self, shutdown_s: float, done_path: str) -> None:
            self.shutdown_s = shutdown_s
            self.done_path = done_path

        def ready(self) -> bool:
            return True

        def shutdown(self) -> None:
            time.sleep(self.shutdown_s)
            Path(self.done_path).write_text("done")

    return ray.remote(num_cpus=0)(SlowShutdown)


def _stop_with_workers(tmp_path: Path, shutdown_s: list[float]) -> tuple[list[bool], float]:
    """Stops a router (never started, so only its workers have anything to stop) with a calls' grace of 0; returns
    which workers finished their shutdown, and how long the stop took."""
    actor = _slow_shutdown_actor()
    done = [tmp_path / f"worker-{index}.done" for index in range(len(shutdown_s))]
    workers = [actor.remote(seconds, str(path)) for seconds, path in zip(shutdown_s, done, strict=True)]
    ray.get([worker.ready.remote() for worker in workers], timeout=120)
    server = MosaicServer(load_config(None, shutdown_drain_s=0.0))
    server._workers = workers
    started_s = time.monotonic()
    asyncio.run(server.stop(0.0))
    return [path.exists() for path in done], time.monotonic() - started_s


def test_workers_stop_side_by_side_for_what_is_left_of_the_grace(ray_cluster, tmp_path):
    # 12 s is past the 10 s each worker had, one after another, but within the grace left (20 s less 4 kept).
    finished, took_s = _stop_with_workers(tmp_path, [12.0, 3.0, 3.0])
    assert finished == [True, True, True]
    assert took_s < 14.0, took_s  # side by side, not 12 + 3 + 3


def test_a_worker_still_stopping_when_the_grace_runs_out_is_named_and_killed(
    ray_cluster, tmp_path, monkeypatch, caplog
):
    # A pod with 3 s past the calls' grace, 1 s of them kept for after the workers: 2 s for the workers.
    monkeypatch.setattr(router, "GRACE_PAST_CALLS_S", 3.0)
    monkeypatch.setattr(router, "AFTER_WORKERS_S", 1.0)
    with caplog.at_level(logging.ERROR, logger="services.router"):
        finished, took_s = _stop_with_workers(tmp_path, [60.0, 0.5])
    assert finished == [False, True]
    assert took_s < 6.0, took_s
    assert "worker 0 did not finish its shutdown" in caplog.text
    assert "worker 1" not in caplog.text


def test_the_frames_a_worker_drops_at_its_shutdown_reach_the_metrics(ray_cluster):
    """The router's telemetry poll ends before its workers stop; what a worker counts as it stops (frames left when its
    shutdown's ingest ran out of time, reason shutdown) comes back with its shutdown, and is counted."""

    class DropsAtShutdown:
        def ready(self) -> bool:
            return True

        def shutdown(self):
            from services.telemetry import TelemetryDelta

            return TelemetryDelta("0", dropped={("cam", "shutdown"): 8}, ingested={"cam": 2})

    worker = ray.remote(num_cpus=0)(DropsAtShutdown).remote()
    ray.get(worker.ready.remote(), timeout=120)
    server = MosaicServer(load_config(None, shutdown_drain_s=0.0))
    server.coordinator = Coordinator([worker], None, server.metrics)
    server.coordinator.placement["cam"] = 0
    server._workers = [worker]
    asyncio.run(server.stop(0.0))
    value = server.metrics.registry.get_sample_value
    assert value("mosaic_frames_dropped_total", {"stream": "cam", "reason": "shutdown"}) == 8
    assert value("mosaic_frames_ingested_total", {"stream": "cam"}) == 2
