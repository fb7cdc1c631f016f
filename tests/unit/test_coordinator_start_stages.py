"""The router's wait for a worker's start (``wait_for_workers``) counts a change of stage as progress: a worker that
tells a new stage within every ``worker_start_timeout_s`` (as a GPU worker's engine build does, step by step, while
it loads its model and warms up) is waited for however long its start takes, and one that tells nothing new for that
long is given up on, naming its last stage.

The workers are stand-ins for Ray handles (``<method>.options(...).remote()`` returns an awaitable) around a real
``WorkerStart``, whose thread steps through stages at a pace the test chooses.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from services import coordinator_start
from services.coordinator_start import wait_for_workers
from services.worker_results import WorkerInfo
from services.worker_start import WorkerStart

TIMEOUT_S = 1.0  # ten times a stage's step: a pause of the 2-core CI machine's is not a stuck start


class _Method:
    def __init__(self, fn):
        self._fn = fn

    def options(self, *, concurrency_group: str):
        return self

    def remote(self):
        async def call():
            return self._fn()

        return call()


class _StagedWorker:
    """A worker whose start tells ``num_stages`` stages, one every ``step_s``, then stays on the last for
    ``last_s`` before it is ready."""

    def __init__(self, num_stages: int, step_s: float, last_s: float = 0.0) -> None:
        self.start = WorkerStart("0")
        self.start_state = _Method(lambda: self.start.state)
        self.info = _Method(lambda: WorkerInfo("0", "cpu", 0, 0, [], 0, 1000))

        def stages() -> None:
            for number in range(1, num_stages + 1):
                self.start.stage(f"building its engine: warming up, question {number} of {num_stages}")
                time.sleep(step_s)
            time.sleep(last_s)

        self.start.run(stages)


@pytest.fixture(autouse=True)
def _quick_polls(monkeypatch):
    monkeypatch.setattr(coordinator_start, "START_POLL_S", 0.05)


def test_the_router_waits_past_the_timeout_for_a_worker_whose_stage_keeps_changing():
    worker = _StagedWorker(num_stages=25, step_s=0.1)  # a start of 2.5 s, a new stage every 0.1 s
    started_s = time.monotonic()
    infos = asyncio.run(wait_for_workers([worker], timeout_s=TIMEOUT_S))
    assert time.monotonic() - started_s > 2 * TIMEOUT_S
    assert [info.worker_id for info in infos] == ["0"] and worker.start.state.ready


def test_the_router_gives_up_on_a_worker_whose_stage_stops_changing_and_names_it():
    worker = _StagedWorker(num_stages=3, step_s=0.1, last_s=30.0)
    started_s = time.monotonic()
    with pytest.raises(TimeoutError) as raised:
        asyncio.run(wait_for_workers([worker], timeout_s=TIMEOUT_S))
    assert time.monotonic() - started_s < 10  # not the last stage's 30 s
    assert "worker 0: last told 'building its engine: warming up, question 3 of 3'" in str(raised.value)
