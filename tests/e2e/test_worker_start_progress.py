"""A worker's constructor returns at once and its start (engine, restore) runs on a thread of its own: while it runs
the worker answers ``start_state`` with its progress, and refuses calls about streams with UNAVAILABLE and a sentence.
A router waits for a worker whose start outlasts ``worker_start_timeout_s`` as long as its state keeps changing, and
gives up, saying so, on one whose state does not change for that long, or whose start failed. Real Ray (the e2e
suite's one cluster), Redis and gRPC.

Two halves: a real worker actor restoring a real data directory (and restoring it again after Ray restarts its
killed process); and the router's real wait (``Coordinator.start``) for actors whose start thread steps through a
real ``RestoreProgress`` at a set pace, so that a start's length and its silences are the test's to choose."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from mosaic_core.config import MIB
from mosaic_core.durable.manifest import MANIFEST_NAME, decode_line, encode_line
from mosaic_core.engine.engine import Engine
from services import coordinator_start
from services.config import load_config
from services.coordinator import Coordinator
from services.errors import WorkerStartError
from services.gen.mosaic.v1 import mosaic_pb2
from services.metadata import StreamRecord
from services.metrics import MosaicMetrics
from services.worker_actor import START_GROUP, TELEMETRY_GROUP, start_state_call, worker_actor
from services.worker_engine import worker_subdir
from tests.engine.engine_helpers import feed
from tests.integration.bare_router import bare_servicer, served

ray = pytest.importorskip("ray")
NUM_STREAMS = 120
TIMEOUT_S = 5.0  # past a light actor's process start (1.5 s here), well short of the paced start below


def _config(data_dir: Path, **overrides):
    return load_config(
        None,
        workers=1,
        worker_cpus=0.5,
        data_dir=str(data_dir),
        redis_namespace=f"start-{os.getpid()}-{time.monotonic_ns()}",
        device_budget_bytes=512 * MIB,
        host_budget_bytes=512 * MIB,
        engine={"target_tokens_per_frame": 16},
        **overrides,
    )


def _clone(stream_dir: Path, stream_id: str) -> None:
    """A copy of the stream in ``stream_dir`` under another id: its journal's lines rewritten, its records linked."""
    new_dir = stream_dir.parent / stream_id
    new_dir.mkdir()
    lines = []
    for line in (stream_dir / MANIFEST_NAME).read_bytes().splitlines(keepends=True):
        text = json.dumps(decode_line(line))
        lines.append(encode_line(json.loads(text.replace(f'"{stream_dir.name}', f'"{stream_id}'))))
    (new_dir / MANIFEST_NAME).write_bytes(b"".join(lines))
    for path in stream_dir.iterdir():
        if path.name != MANIFEST_NAME:
            os.link(path, new_dir / path.name)


@pytest.fixture(scope="module")
def many_streams(tiny_model, bikes_frames, tmp_path_factory) -> Path:
    """A data directory whose worker 0 holds ``NUM_STREAMS`` streams, each with the same few sealed clusters: a
    restore of a second or two here."""
    data_dir = tmp_path_factory.mktemp("many-streams")
    config = _config(data_dir)
    engine = Engine(tiny_model, config.engine_config(worker_subdir=worker_subdir(0)))
    record = StreamRecord(stream_id="cam0000", fps=2.0)
    meta = {k: v for k, v in dataclasses.asdict(record).items() if k != "worker_id"}
    engine.open_stream("cam0000", fps=2.0, meta=meta)
    feed(engine, "cam0000", bikes_frames[:8])
    engine.checkpoint()  # its window's frames sealed into clusters too: records to read back
    engine.close()
    first = data_dir / worker_subdir(0) / "cam0000"
    for index in range(1, NUM_STREAMS):
        _clone(first, f"cam{index:04d}")
    return data_dir


@pytest.fixture(scope="module")
def restoring_worker(ray_cluster, redis_server, many_streams):
    """A real worker actor, just created on ``many_streams``: its start has only begun."""
    config = _config(many_streams, redis_url=redis_server.url)
    worker = worker_actor(config).remote("0", config)
    yield worker
    try:
        ray.get(worker.shutdown.remote(), timeout=60)
    finally:
        ray.kill(worker, no_restart=True)


def _states_until_ready(worker, timeout_s: float, on_first=None) -> list:
    """Every distinct start state the worker answers until it is ready (asked again while Ray restarts it);
    ``on_first(state)`` once, at the first."""
    seen: list = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not (seen and seen[-1].ready):
        try:
            state = ray.get(start_state_call(worker).remote(), timeout=timeout_s)
        except ray.exceptions.ActorUnavailableError:  # its process killed, Ray has not restarted it yet
            time.sleep(0.1)
            continue
        if not seen and on_first is not None:
            on_first(state)
        if not seen or state != seen[-1]:
            seen.append(state)
        time.sleep(0.005)
    assert seen and seen[-1].ready, f"the worker did not start within {timeout_s:g} s: {seen[-1:]}"
    return seen


async def _get_stream_status(worker, stream_id: str) -> tuple[grpc.StatusCode, str]:
    """GetStream of ``stream_id`` through a real router servicer and gRPC, the stream placed on ``worker``."""
    servicer = bare_servicer()
    servicer.coordinator.workers = [worker]
    servicer.coordinator.placement = {stream_id: 0}
    async with served(servicer) as stub:
        try:
            await stub.GetStream(mosaic_pb2.GetStreamRequest(stream_id=stream_id), timeout=30)
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def test_a_starting_worker_answers_its_start_state_and_refuses_stream_calls_until_ready(restoring_worker):
    refused: list = []

    def ask_a_stream(state) -> None:  # at the first answer the start has only begun: the restore is still ahead
        assert not state.ready, state
        refused.append(asyncio.run(_get_stream_status(restoring_worker, "cam0000")))

    seen = _states_until_ready(restoring_worker, 400.0, on_first=ask_a_stream)
    code, details = refused[0]
    assert code == grpc.StatusCode.UNAVAILABLE and details.startswith("worker 0 is still starting: "), refused
    counts = [state.restore for state in seen if state.restore is not None and not state.ready]
    reopened = [count.num_done for count in counts if count.doing == "reopening streams"]
    # a progress that keeps changing while it restores, each count past the one before
    assert len(reopened) >= 3 and reopened == sorted(reopened), [state.text for state in seen]
    last = [state.text for state in seen if state.restore is not None and not state.ready][-1]
    assert last.startswith(f"restoring history, reopening streams: {NUM_STREAMS} of {NUM_STREAMS} done"), last
    assert counts[-1].num_records > 0 and ", with 0 cluster records" not in last, last
    info = ray.get(restoring_worker.info.remote(), timeout=60)
    assert len(info.restored_streams) == NUM_STREAMS
    assert asyncio.run(_get_stream_status(restoring_worker, "cam0000")) == (grpc.StatusCode.OK, "")


def test_a_worker_ray_restarts_restores_its_streams_again(restoring_worker):
    _states_until_ready(restoring_worker, 400.0)
    pid = ray.get(restoring_worker.info.remote(), timeout=60).pid
    os.kill(pid, signal.SIGKILL)  # Ray restarts it (max_restarts): its constructor starts the restore again
    seen = _states_until_ready(restoring_worker, 400.0)
    info = ray.get(restoring_worker.info.remote(), timeout=60)
    assert info.pid != pid and len(info.restored_streams) == NUM_STREAMS
    assert any(state.restore is not None and not state.ready for state in seen), [s.text for s in seen]


def _paced_worker():
    """An actor class that stands in for a worker's start: its constructor starts a real ``WorkerStart`` that steps
    through a real ``RestoreProgress`` of ``num_streams`` streams, ``step_s`` each; after ``stuck_after`` steps it
    stops moving for ``stuck_s``, and after ``fail_after`` steps it fails. Defined in a function so that Ray ships it
    by value."""

    class PacedStart:
        def __init__(self, num_streams: int, step_s: float, stuck_after=-1, stuck_s=0.0, fail_after=-1):
            from mosaic_core.durable.progress import RestoreProgress
            from services.worker_start import WorkerStart

            def steps() -> None:
                self.start.stage("building its engine")
                progress = RestoreProgress("reopening streams", num_streams, self.start.restore_step)
                for index in range(num_streams):
                    if index == fail_after:
                        raise OSError("the data volume went away")
                    time.sleep(stuck_s if index == stuck_after else step_s)
                    progress.step(num_records=10)

            self.start = WorkerStart("0")
            self.start.run(steps)

        def start_state(self):
            return self.start.state

        def info(self):
            from services.worker_results import WorkerInfo

            return WorkerInfo("0", "cpu", 0, 0, [], 0, os.getpid())

        def stream_ids(self) -> list[str]:  # asked on the telemetry threads, as of a worker
            return []

    return ray.remote(num_cpus=0, concurrency_groups={TELEMETRY_GROUP: 1, START_GROUP: 1})(PacedStart)


def _wait_for_paced(**pace) -> tuple[Coordinator, float]:
    worker = _paced_worker().remote(**pace)
    coordinator = Coordinator([worker], None, MosaicMetrics())
    started_s = time.monotonic()
    try:
        asyncio.run(coordinator.start(TIMEOUT_S))
    finally:
        took_s = time.monotonic() - started_s
        ray.kill(worker, no_restart=True)
    return coordinator, took_s


def test_the_router_waits_past_the_timeout_for_a_worker_that_keeps_restoring(ray_cluster, caplog, monkeypatch):
    monkeypatch.setattr(coordinator_start, "START_LOG_S", 1.0)
    # 12 steps of 0.8 s: a start of about 10 s, twice the timeout, each step well within it
    with caplog.at_level(logging.INFO, logger="services.coordinator_start"):
        coordinator, took_s = _wait_for_paced(num_streams=12, step_s=0.8)
    assert coordinator.started and took_s > TIMEOUT_S, took_s
    said = [r.getMessage() for r in caplog.records if r.name == "services.coordinator_start"]
    assert any("restoring history, reopening streams" in line for line in said), said


def test_the_router_gives_up_on_a_worker_stuck_past_the_timeout_and_says_where_it_stopped(ray_cluster):
    started_s = time.monotonic()
    with pytest.raises(TimeoutError) as raised:
        # a step every 0.5 s, then none after the third
        _wait_for_paced(num_streams=12, step_s=0.5, stuck_after=3, stuck_s=60.0)
    assert time.monotonic() - started_s < 30  # not the stuck step's minute
    text = str(raised.value)
    assert f"made no progress for {TIMEOUT_S:g} s (worker_start_timeout_s)" in text
    assert "worker 0: last told 'restoring history, reopening streams: 3 of 12 done" in text


def test_the_router_fails_the_start_of_a_worker_whose_start_failed_with_its_error(ray_cluster):
    started_s = time.monotonic()
    with pytest.raises(WorkerStartError, match=r"worker 0 did not start: its start failed while restoring history: "
                       r"OSError: the data volume went away"):  # fmt: skip
        _wait_for_paced(num_streams=12, step_s=0.1, fail_after=2)
    assert time.monotonic() - started_s < TIMEOUT_S + 10  # at once, not after the silence's timeout
