"""A router waits for a worker whose start outlasts ``worker_start_timeout_s`` as long as its restore makes progress,
and gives up, saying so, on one that makes none for that long. Real Ray (the e2e suite's one cluster) and its
key-value store, through which a starting worker tells its progress.

Two halves: a real ``WorkerCore`` restoring a real data directory tells each step of its restore (built in this
process, where Ray is up, so that the test does not wait for a worker process to import torch: 40 s on this 2-core
CI machine, more than a short timeout); and the router's real wait (``Coordinator.start``) for actors whose
constructors step through a real ``RestoreProgress`` at a set pace, so that a start's length and its silences are
the test's to choose."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from mosaic_core.config import MIB
from mosaic_core.durable.manifest import MANIFEST_NAME, decode_line, encode_line
from mosaic_core.engine.engine import Engine
from services import coordinator_start, start_progress
from services.config import load_config
from services.coordinator import Coordinator
from services.metadata import StreamRecord
from services.metadata.memory import InMemoryMetadataStore
from services.metrics import MosaicMetrics
from services.start_progress import forget_progress, read_progress
from services.worker import WorkerCore
from services.worker_actor import TELEMETRY_GROUP
from tests.engine.engine_helpers import feed

ray = pytest.importorskip("ray")
NUM_STREAMS = 40
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
    """A data directory whose worker 0 holds ``NUM_STREAMS`` streams, each with the same few sealed clusters."""
    data_dir = tmp_path_factory.mktemp("many-streams")
    config = _config(data_dir)
    engine = Engine(tiny_model, config.engine_config(worker_subdir="w0"))
    record = StreamRecord(stream_id="cam0000", fps=2.0)
    meta = {k: v for k, v in dataclasses.asdict(record).items() if k != "worker_id"}
    engine.open_stream("cam0000", fps=2.0, meta=meta)
    feed(engine, "cam0000", bikes_frames[:8])
    engine.checkpoint()  # its window's frames sealed into clusters too: records to read back
    engine.close()
    first = data_dir / "w0" / "cam0000"
    for index in range(1, NUM_STREAMS):
        _clone(first, f"cam{index:04d}")
    return data_dir


def test_a_starting_worker_tells_each_step_of_its_restore(ray_cluster, tiny_model, many_streams, monkeypatch):
    monkeypatch.setattr(start_progress, "REPORT_INTERVAL_S", 0.0)  # every step, so the poll below sees some
    config = _config(many_streams)
    forget_progress(config.redis_namespace, ["0"])
    seen: list[str] = []
    worker = None
    engine = Engine(tiny_model, config.engine_config(worker_subdir="w0"))

    def build() -> None:
        nonlocal worker
        worker = WorkerCore("0", config, store=InMemoryMetadataStore(), engine=engine)

    builder = threading.Thread(target=build, daemon=True)
    builder.start()
    deadline = time.monotonic() + 120
    while builder.is_alive() and time.monotonic() < deadline:
        line = read_progress(config.redis_namespace, ["0"])["0"]
        if line is not None and (not seen or seen[-1] != line):
            seen.append(line)
        time.sleep(0.01)
    builder.join(1)
    assert worker is not None, "the worker did not start within 120 s"
    try:
        assert len(worker.restored_streams) == NUM_STREAMS
        seen.append(read_progress(config.redis_namespace, ["0"])["0"])
        # the engine here is built already, so its stage may be overwritten before the first poll: then reading
        assert seen[0] == "building its engine" or seen[0].startswith("restoring history, reading streams"), seen
        reading = [line for line in seen if "reading streams" in line]
        reopening = [line for line in seen if "reopening streams" in line]
        # lines that keep changing while it restores (reading 40 streams is quick: a poll may catch only one of them)
        assert reading and reopening and len(reading) + len(reopening) > 3, seen
        assert seen[-1].startswith(f"restoring history, reopening streams: {NUM_STREAMS} of {NUM_STREAMS} done")
        assert ", with 0 cluster records" not in seen[-1], seen[-1]
    finally:
        worker.shutdown()


def _paced_worker():
    """An actor class that stands in for a worker's start: its constructor steps through a real ``RestoreProgress``
    of ``num_streams`` streams, ``step_s`` each, told through the worker's real ``StartReporter``; after
    ``stuck_after`` steps it stops moving for ``stuck_s``. Defined in a function so that Ray ships it by value."""

    class PacedStart:
        def __init__(self, namespace: str, num_streams: int, step_s: float, stuck_after: int, stuck_s: float):
            from mosaic_core.durable.progress import RestoreProgress
            from services.start_progress import StartReporter

            reporter = StartReporter(namespace, "0")
            reporter.stage("building its engine")
            progress = RestoreProgress("reopening streams", num_streams, reporter.restore_step)
            for index in range(num_streams):
                time.sleep(stuck_s if index == stuck_after else step_s)
                progress.step(num_records=10)

        def info(self):
            from services.worker_results import WorkerInfo

            return WorkerInfo("0", "cpu", 0, 0, [], 0, os.getpid())

        def stream_ids(self) -> list[str]:  # asked on the telemetry threads, as of a worker
            return []

    return ray.remote(num_cpus=0, concurrency_groups={TELEMETRY_GROUP: 1})(PacedStart)


def _wait_for_paced(tmp_path, **pace) -> tuple[Coordinator, float]:
    namespace = f"paced-{os.getpid()}-{time.monotonic_ns()}"
    forget_progress(namespace, ["0"])
    worker = _paced_worker().remote(namespace, **pace)
    coordinator = Coordinator([worker], None, MosaicMetrics())
    started_s = time.monotonic()
    try:
        asyncio.run(coordinator.start(TIMEOUT_S, namespace=namespace))
    finally:
        took_s = time.monotonic() - started_s
        ray.kill(worker, no_restart=True)
    return coordinator, took_s


def test_the_router_waits_past_the_timeout_for_a_worker_that_keeps_restoring(
    ray_cluster, tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr(coordinator_start, "START_LOG_S", 1.0)
    # 12 steps of 0.8 s: a start of about 10 s, twice the timeout, each step well within it
    with caplog.at_level(logging.INFO, logger="services.coordinator_start"):
        coordinator, took_s = _wait_for_paced(tmp_path, num_streams=12, step_s=0.8, stuck_after=-1, stuck_s=0.0)
    assert coordinator.started and took_s > TIMEOUT_S, took_s
    said = [r.getMessage() for r in caplog.records if r.name == "services.coordinator_start"]
    assert any("restoring history, reopening streams" in line for line in said), said


def test_the_router_gives_up_on_a_worker_stuck_past_the_timeout_and_says_where_it_stopped(ray_cluster, tmp_path):
    started_s = time.monotonic()
    with pytest.raises(TimeoutError) as raised:
        # a line a step (1.1 s: past the reporter's 1 s), then none after the third
        _wait_for_paced(tmp_path, num_streams=12, step_s=1.1, stuck_after=3, stuck_s=60.0)
    assert time.monotonic() - started_s < 30  # not the stuck step's minute
    text = str(raised.value)
    assert f"made no progress for {TIMEOUT_S:g} s (worker_start_timeout_s)" in text
    assert "worker 0: last told 'restoring history, reopening streams: 3 of 12 done" in text
