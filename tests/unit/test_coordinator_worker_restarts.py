"""The router's coordinator when a worker restarts: streams a restarted worker restored are placed again, and the
gauges of a worker that stopped answering do not keep reading healthy.

The worker actors are stand-ins for Ray handles (``<method>.remote(...)`` returns an awaitable, and a dead one raises
``RayActorError`` as Ray does), so that a test can crash and restart one between two calls; the coordinator and the
metrics are the router's own.
"""

from __future__ import annotations

import asyncio

import pytest
import ray.exceptions

from mosaic_core.errors import AlreadyExistsError, UnknownStreamError
from services import coordinator_polls
from services.config import load_config
from services.coordinator import Coordinator
from services.errors import UnavailableError, WorkerGoneError
from services.metadata.base import StreamRecord
from services.metrics import MosaicMetrics
from services.router import MosaicServer
from services.telemetry import DurabilityHealth, TelemetryDelta
from services.worker_results import StreamInfo, WorkerInfo
from services.worker_start import StartState


class _Method:
    def __init__(self, fn):
        self._fn = fn
        self.groups: list[str] = []  # the concurrency group each call asked for

    def options(self, *, concurrency_group: str):
        self.groups.append(concurrency_group)
        return self

    def remote(self, *args):
        async def call():
            return self._fn(*args)

        return call()


class Worker:
    """A worker whose streams are durable from the moment it opens them, as ``Engine.open_stream`` makes them."""

    def __init__(self, index: int) -> None:
        self.index, self.pid, self.alive = index, 1000, True
        self.streams: dict[str, StreamRecord] = {}
        self.restored: list[str] = []  # what it restored when it last started
        self.free_bytes = 1 << 30
        self.crash_before_answering_open = False
        self.reported_dead = False  # the next call raises ActorDiedError, though the worker lives
        for name in ("start_state", "info", "stream_ids", "open_stream", "close_stream", "stream_info",
                     "stream_infos", "drain_telemetry", "keyframe_stats"):  # fmt: skip
            setattr(self, name, _Method(self._live(getattr(self, "_" + name))))

    def _live(self, fn):
        def call(*args):
            if self.reported_dead:
                self.reported_dead = False
                raise ray.exceptions.ActorDiedError()
            if not self.alive:
                raise ray.exceptions.RayActorError()
            return fn(*args)

        return call

    def restart(self) -> None:
        self.pid += 1
        self.alive = True
        self.restored = sorted(self.streams)

    def _start_state(self):
        return StartState(str(self.index), "ready", ready=True)

    def _info(self):
        return WorkerInfo(str(self.index), "cpu", len(self.streams), self.free_bytes, self.restored, 0, self.pid)

    def _stream_ids(self):
        return sorted(self.streams)

    def _open_stream(self, record):
        if record.stream_id in self.streams:
            raise AlreadyExistsError(f"stream {record.stream_id!r} is already open on this engine")
        self.streams[record.stream_id] = record
        if self.crash_before_answering_open:
            self.crash_before_answering_open, self.alive = False, False
            raise ray.exceptions.RayActorError()

    def _close_stream(self, stream_id):
        if self.streams.pop(stream_id, None) is None:
            raise UnknownStreamError(f"stream {stream_id!r} is not open")
        return 0

    def _stream_info(self, stream_id):
        if stream_id not in self.streams:
            raise UnknownStreamError(f"stream {stream_id!r} is not open")
        return StreamInfo(self.streams[stream_id], 0, 0, 0, 0, {}, {}, None, None, 0.0, 0, 0, "")

    def _stream_infos(self):
        return [self._stream_info(s) for s in sorted(self.streams)]

    def _drain_telemetry(self):
        delta = TelemetryDelta(str(self.index), queue_depths={s: 3 for s in self.streams})
        delta.lags_s = dict.fromkeys(self.streams, 0.25)
        delta.pid = self.pid
        delta.durability = DurabilityHealth(pid=self.pid, store_up=True)
        return delta

    def _keyframe_stats(self):
        return (0, 0)


async def _started(worker: Worker, metrics: MosaicMetrics | None = None) -> Coordinator:
    coordinator = Coordinator([worker], None, metrics or MosaicMetrics())
    await coordinator.start(5.0)
    return coordinator


async def _create_whose_answer_is_lost(coordinator: Coordinator, worker: Worker) -> None:
    worker.crash_before_answering_open = True
    with pytest.raises(UnavailableError):
        await coordinator.create_stream(StreamRecord(stream_id="cam", fps=1.0))
    worker.restart()  # Ray restarts it; it restores "cam" from its data directory


def test_a_telemetry_poll_places_a_stream_a_restarted_worker_restored():
    async def scenario():
        worker = Worker(0)
        coordinator = await _started(worker)
        await _create_whose_answer_is_lost(coordinator, worker)
        with pytest.raises(UnknownStreamError):
            await coordinator.get_stream("cam")
        await coordinator.poll_telemetry(1.0)  # another process answers: its streams are asked for
        assert (await coordinator.get_stream("cam")).record.stream_id == "cam"
        assert await coordinator.delete_stream("cam") == 0 and worker.streams == {}

    asyncio.run(scenario())


def test_a_create_retried_after_a_lost_answer_says_the_stream_exists_and_places_it():
    async def scenario():
        worker = Worker(0)
        coordinator = await _started(worker)
        await _create_whose_answer_is_lost(coordinator, worker)
        with pytest.raises(AlreadyExistsError, match="an earlier CreateStream made it"):
            await coordinator.create_stream(StreamRecord(stream_id="cam", fps=1.0))
        assert (await coordinator.get_stream("cam")).record.stream_id == "cam"

    asyncio.run(scenario())


def test_a_listing_places_what_the_workers_list_but_not_a_stream_deleted_since_it_was_asked():
    async def scenario():
        worker = Worker(0)
        coordinator = await _started(worker)
        await _create_whose_answer_is_lost(coordinator, worker)
        assert [i.record.stream_id for i in await coordinator.list_streams()] == ["cam"]
        assert coordinator.placement == {"cam": 0}

        release = asyncio.Event()
        listed_before_the_delete = worker._stream_infos()

        async def held_listing():
            await release.wait()
            return listed_before_the_delete

        worker.stream_infos = type("Held", (), {"remote": staticmethod(held_listing)})
        listing = asyncio.ensure_future(coordinator.list_streams())
        await asyncio.sleep(0)  # the listing is asked for
        await coordinator.delete_stream("cam")
        release.set()
        assert [i.record.stream_id for i in await listing] == ["cam"]  # what the worker held when asked
        assert "cam" not in coordinator.placement  # but its delete ended after that: not placed again

    asyncio.run(scenario())


def test_a_silent_workers_own_gauges_go_and_its_streams_lag_grows_until_it_answers():
    metrics = MosaicMetrics()

    def value(name, **labels):
        return metrics.registry.get_sample_value(name, labels)

    async def scenario():
        worker = Worker(0)
        coordinator = await _started(worker, metrics)
        await coordinator.create_stream(StreamRecord(stream_id="cam", fps=1.0))
        await coordinator.poll_telemetry(1.0)
        assert value("mosaic_stream_lag_seconds", stream="cam") == 0.25
        assert value("mosaic_worker_pid", worker="0") == 1000
        worker.alive = False
        await coordinator.poll_telemetry(1.0)
        first = value("mosaic_stream_lag_seconds", stream="cam")
        await asyncio.sleep(0.05)
        await coordinator.poll_telemetry(1.0)
        assert value("mosaic_workers_up") == 0
        assert value("mosaic_worker_pid", worker="0") is None and value("mosaic_metadata_store_up", worker="0") is None
        assert 0.25 <= first < value("mosaic_stream_lag_seconds", stream="cam")  # growing, from the last reported
        assert value("mosaic_ingest_queue_depth", stream="cam") == 0
        worker.restart()
        await coordinator.poll_telemetry(1.0)
        assert value("mosaic_stream_lag_seconds", stream="cam") == 0.25
        assert value("mosaic_worker_pid", worker="0") == 1001 and value("mosaic_workers_up") == 1

    asyncio.run(scenario())


def test_a_drain_slower_than_the_poll_is_applied_at_the_next_poll_not_lost():
    """The worker hands its counts over as it answers a drain: one the router stopped waiting for must still count."""
    metrics = MosaicMetrics()

    async def scenario():
        worker = Worker(0)
        coordinator = await _started(worker, metrics)
        await coordinator.create_stream(StreamRecord(stream_id="cam", fps=1.0))
        release, drain = asyncio.Event(), worker.drain_telemetry

        async def slow_drain():
            await release.wait()
            delta = worker._drain_telemetry()
            delta.ingested = {"cam": 5}
            return delta

        worker.drain_telemetry = _Method(None)
        worker.drain_telemetry.remote = slow_drain
        await coordinator.poll_telemetry(0.05)  # the answer is late: this poll stops waiting for it
        worker.drain_telemetry = drain  # a new drain would hand over nothing more
        release.set()
        await coordinator.poll_telemetry(1.0)
        assert metrics.registry.get_sample_value("mosaic_frames_ingested_total", {"stream": "cam"}) == 5

    asyncio.run(scenario())


def test_a_worker_that_keeps_only_history_of_an_id_does_not_get_the_stream_placed():
    """A worker also refuses a create as ALREADY_EXISTS when it keeps history of the id it cannot serve (a restore
    that failed): the router does not place the stream there, and says why the id cannot be created."""

    class KeepingHistory(Worker):
        def _open_stream(self, record):
            raise AlreadyExistsError(f"stream {record.stream_id!r} already has history in this worker's data folder")

    async def scenario():
        coordinator = await _started(KeepingHistory(0))
        with pytest.raises(AlreadyExistsError, match=r"cannot be created: worker 0: .*already has history"):
            await coordinator.create_stream(StreamRecord(stream_id="cam", fps=1.0))
        assert "cam" not in coordinator.placement

    asyncio.run(scenario())


def test_a_create_retried_before_the_router_knows_a_restored_stream_is_not_made_twice():
    """The retried create would go to the worker with more room; the one that restored the stream holds it."""

    async def scenario():
        restored, roomier = Worker(0), Worker(1)
        coordinator = Coordinator([restored, roomier], None, MosaicMetrics())
        await coordinator.start(5.0)
        roomier.free_bytes = restored.free_bytes // 2
        await _create_whose_answer_is_lost(coordinator, restored)  # the first create goes to the roomier worker 0
        roomier.free_bytes = restored.free_bytes * 2  # the retry would go to worker 1 now
        with pytest.raises(AlreadyExistsError, match="already exists on worker 0"):
            await coordinator.create_stream(StreamRecord(stream_id="cam", fps=1.0))
        assert coordinator.placement == {"cam": 0} and "cam" not in roomier.streams

    asyncio.run(scenario())


def test_a_worker_whose_engine_thread_is_stuck_is_not_ready_until_it_moves():
    """It answers polls (a control thread serves them), so only the stall it reports tells it apart: readiness and
    new streams leave it until its engine thread moves again."""
    from services.coordinator_polls import ENGINE_STALL_S

    async def scenario():
        worker = Worker(0)
        coordinator = await _started(worker)
        await coordinator.poll_telemetry(1.0)
        assert coordinator.ready_workers == {0}
        drain = worker._drain_telemetry
        stalled_s = [ENGINE_STALL_S + 1.0]

        def stuck():
            delta = drain()
            delta.engine_stalled_s = stalled_s[0]
            return delta

        worker.drain_telemetry = _Method(worker._live(stuck))
        await coordinator.poll_telemetry(1.0)
        assert coordinator.alive_workers == {0} and coordinator.ready_workers == frozenset()
        with pytest.raises(UnavailableError, match="no worker is up"):
            await coordinator.create_stream(StreamRecord(stream_id="cam", fps=1.0))
        stalled_s[0] = 0.5
        await coordinator.poll_telemetry(1.0)
        assert coordinator.ready_workers == {0}
        await coordinator.create_stream(StreamRecord(stream_id="cam", fps=1.0))

    asyncio.run(scenario())


def test_questions_waiting_on_a_worker_end_when_a_poll_marks_it_down_stuck_or_silent(monkeypatch):
    """A stuck engine thread (the worker answers polls) and a worker that stops answering both end the answers
    waiting on it (``down_signal``), and a question sent to it then is refused at once, UNAVAILABLE naming why."""
    from services.coordinator_polls import ENGINE_STALL_S

    def ask(coordinator):
        return anext(coordinator.ask("q", "cam", "what?", max_new_tokens=2, time_range=None, timeout_s=5.0))

    async def scenario():
        worker = Worker(0)
        coordinator = await _started(worker)
        await coordinator.create_stream(StreamRecord(stream_id="cam", fps=1.0))
        waiting = coordinator.down_signal(0)
        drain = worker._drain_telemetry

        def stuck():
            delta = drain()
            delta.engine_stalled_s = ENGINE_STALL_S + 1.0
            return delta

        worker.drain_telemetry = _Method(worker._live(stuck))
        await coordinator.poll_telemetry(1.0)
        assert waiting.done()
        with pytest.raises(UnavailableError, match=r"worker 0 is unavailable \(its engine thread has been stuck"):
            await ask(coordinator)
        worker.drain_telemetry = _Method(worker._live(drain))
        await coordinator.poll_telemetry(1.0)
        assert coordinator.ready_workers == {0}
        waiting = coordinator.down_signal(0)
        worker.alive = False
        await coordinator.poll_telemetry(1.0)
        assert not waiting.done() and not coordinator.is_down(0)  # one late answer from a busy worker ends nothing
        monkeypatch.setattr(coordinator_polls, "DOWN_AFTER_S", 0.05)
        await asyncio.sleep(0.06)
        await coordinator.poll_telemetry(1.0)
        assert waiting.done()
        with pytest.raises(UnavailableError, match="worker 0 is unavailable \\(it stopped answering the router") as err:
            await ask(coordinator)
        assert "'cam'" in str(err.value) and "retry shortly" in str(err.value)

    asyncio.run(scenario())


def test_the_routers_polls_run_on_the_workers_telemetry_threads():
    """A worker's control threads may all wait for its engine thread (stream calls, keyframes of every camera): a
    poll queued behind them timed out, and the router counted a busy worker down. Its polls have threads of their
    own, which the worker actor declares."""
    from services.config import ServiceConfig
    from services.worker_actor import TELEMETRY_GROUP, worker_concurrency_groups

    async def scenario():
        worker = Worker(0)
        coordinator = await _started(worker)
        await coordinator.create_stream(StreamRecord(stream_id="cam", fps=1.0))
        worker.restart()
        await coordinator.poll_telemetry(1.0)
        polls = {name: getattr(worker, name).groups for name in ("drain_telemetry", "keyframe_stats", "stream_ids")}
        assert all(groups and set(groups) == {TELEMETRY_GROUP} for groups in polls.values()), polls
        assert worker.open_stream.groups == []  # stream calls stay on the control threads

    asyncio.run(scenario())
    assert worker_concurrency_groups(ServiceConfig())[TELEMETRY_GROUP] >= 1


def test_a_stream_a_restarted_worker_no_longer_holds_loses_its_frozen_gauges():
    """The worker set the stream aside at its restart: nothing reports the stream's lag any more, so its last
    value would stay on the dashboard for good."""
    metrics = MosaicMetrics()

    async def scenario():
        worker = Worker(0)
        coordinator = await _started(worker, metrics)
        await coordinator.create_stream(StreamRecord(stream_id="cam", fps=1.0))
        await coordinator.poll_telemetry(1.0)
        assert metrics.registry.get_sample_value("mosaic_stream_lag_seconds", {"stream": "cam"}) == 0.25
        del worker.streams["cam"]  # set aside as the worker restarted
        worker.restart()
        await coordinator.poll_telemetry(1.0)
        assert metrics.registry.get_sample_value("mosaic_stream_lag_seconds", {"stream": "cam"}) is None
        assert metrics.registry.get_sample_value("mosaic_ingest_queue_depth", {"stream": "cam"}) is None

    asyncio.run(scenario())


def test_one_workers_bad_telemetry_does_not_lose_the_others_counts():
    """An error applying one worker's delta (a value the metrics refuse) ended the whole poll: the workers after it
    lost the counts they had handed over, and liveness was not updated that round."""
    metrics = MosaicMetrics()

    async def scenario():
        first, second = Worker(0), Worker(1)
        coordinator = Coordinator([first, second], None, metrics)
        await coordinator.start(5.0)
        await coordinator.create_stream(StreamRecord(stream_id="cam", fps=1.0))
        drains = {0: first._drain_telemetry, 1: second._drain_telemetry}

        def refused_delta():
            delta = drains[0]()
            delta.device_hit_ratio = float("nan")  # the metrics refuse it
            delta.kernel_compiles = -1
            return delta

        def counted_delta():
            delta = drains[1]()
            delta.ingested = {"cam": 7}
            return delta

        first.drain_telemetry = _Method(first._live(refused_delta))
        second.drain_telemetry = _Method(second._live(counted_delta))
        await coordinator.poll_telemetry(1.0)
        assert metrics.registry.get_sample_value("mosaic_frames_ingested_total", {"stream": "cam"}) == 7
        assert metrics.registry.get_sample_value("mosaic_workers_up") == 2

    asyncio.run(scenario())


def test_workers_loading_their_model_read_as_starting_not_down_until_they_answer():
    """From the router's first scrape its workers load the model (minutes on a GPU): they read as starting, which
    MosaicWorkerDown waits for, not as down; once they answered they are up, and one that never answers within the
    start-up wait is starting no more (the router gives up and stops)."""
    server = MosaicServer(load_config(None, workers=1))

    def up_and_starting():
        return tuple(
            server.metrics.registry.get_sample_value(n) for n in ("mosaic_workers_up", "mosaic_workers_starting")
        )

    assert up_and_starting() == (0, 1)  # before Ray or any worker exists

    async def scenario(*, loads: bool, timeout_s: float):
        worker, loaded = Worker(0), asyncio.Event()

        async def loading_state():  # a worker process still starting answers nothing yet
            await loaded.wait()
            return worker._start_state()

        worker.start_state = _Method(None)
        worker.start_state.remote = loading_state
        starting = asyncio.ensure_future(Coordinator([worker], None, server.metrics).start(timeout_s))
        await asyncio.sleep(0.05)
        assert up_and_starting() == (0, 1)
        if loads:
            loaded.set()
        await starting

    asyncio.run(scenario(loads=True, timeout_s=5.0))
    assert up_and_starting() == (1, 0)

    server = MosaicServer(load_config(None, workers=1))
    with pytest.raises(TimeoutError):
        asyncio.run(scenario(loads=False, timeout_s=0.2))
    assert up_and_starting() == (0, 0)


def test_a_stopped_workers_last_telemetry_counts_with_a_drain_its_stop_cut_short():
    """The router stops polling before its workers stop: a drain answered after its poll gave up, and what the worker
    counted as it stopped (handed back by its shutdown), both reach the metrics."""
    metrics = MosaicMetrics()

    async def scenario():
        worker = Worker(0)
        coordinator = await _started(worker, metrics)
        await coordinator.create_stream(StreamRecord(stream_id="cam", fps=1.0))
        release = asyncio.Event()

        async def slow_drain():
            await release.wait()
            return TelemetryDelta("0", ingested={"cam": 5})

        worker.drain_telemetry = _Method(None)
        worker.drain_telemetry.remote = slow_drain
        await coordinator.poll_telemetry(0.05)  # the last poll before the stop stops waiting for its answer
        release.set()
        await asyncio.sleep(0.01)
        coordinator.take_last_telemetry(0, TelemetryDelta("0", dropped={("cam", "shutdown"): 3}))
        value = metrics.registry.get_sample_value
        assert value("mosaic_frames_ingested_total", {"stream": "cam"}) == 5
        assert value("mosaic_frames_dropped_total", {"stream": "cam", "reason": "shutdown"}) == 3

    asyncio.run(scenario())


def test_a_drain_answered_after_a_delete_leaves_no_lag_of_the_deleted_stream():
    """A drain the worker answered before a delete, applied after it (the poll waits for every worker, and a slow
    answer is applied at a later poll), must not bring the deleted stream's lag back into the router's table:
    nothing would remove it again, so with streams created and deleted all day the table only grew."""

    async def scenario():
        worker = Worker(0)
        coordinator = await _started(worker)
        stream_ids = [f"cam-{i}" for i in range(5)]
        for stream_id in stream_ids:
            await coordinator.create_stream(StreamRecord(stream_id=stream_id, fps=1.0))
        release = asyncio.Event()
        drained_before_the_deletes = worker._drain_telemetry()

        async def held_drain():
            await release.wait()
            return drained_before_the_deletes

        held = type("Held", (), {"remote": staticmethod(held_drain)})
        worker.drain_telemetry = type("Method", (), {"options": staticmethod(lambda **_: held)})
        poll = asyncio.ensure_future(coordinator.poll_telemetry(5.0))
        await asyncio.sleep(0)  # the drain is asked for
        for stream_id in stream_ids[1:]:
            await coordinator.delete_stream(stream_id)
        release.set()
        await poll
        assert set(coordinator._last_lags) == {"cam-0"}  # the stream still placed keeps its lag

    asyncio.run(scenario())


def test_a_worker_reported_gone_that_answers_a_poll_keeps_its_streams():
    async def scenario():
        worker, metrics = Worker(0), MosaicMetrics()
        coordinator = await _started(worker, metrics)
        await coordinator.create_stream(StreamRecord(stream_id="cam", fps=1.0))
        worker.reported_dead = True
        with pytest.raises(WorkerGoneError):
            await coordinator.get_stream("cam")
        assert metrics.registry.get_sample_value("mosaic_workers_gone") == 1
        await coordinator.poll_telemetry(1.0)  # it answers: not gone, whatever Ray said
        assert metrics.registry.get_sample_value("mosaic_workers_gone") == 0
        assert await coordinator.delete_stream("cam") == 0 and worker.streams == {}  # through the worker itself

    asyncio.run(scenario())


def test_a_worker_found_gone_while_ranking_workers_for_a_new_stream_is_counted_gone():
    async def scenario():
        worker, metrics = Worker(0), MosaicMetrics()
        coordinator = await _started(worker, metrics)
        worker.reported_dead = True
        with pytest.raises(UnavailableError, match="no worker is up"):
            await coordinator.create_stream(StreamRecord(stream_id="cam", fps=1.0))
        assert metrics.registry.get_sample_value("mosaic_workers_gone") == 1

    asyncio.run(scenario())
