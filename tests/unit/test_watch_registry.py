"""The router's watch registry on the in-memory store: resume, gaps, deletion, limits (no workers, no Ray)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from mosaic_core.engine.watching import SealedSpan
from mosaic_core.errors import AlreadyExistsError, CapacityError, InvalidArgumentError, NotFoundError
from services.config import load_config
from services.coordinator import Coordinator
from services.gen.mosaic.v1 import mosaic_pb2 as pb
from services.metadata.watches import InMemoryWatchStore
from services.metrics import MosaicMetrics
from services.scheduler import QueryQueue
from services.servicer import MosaicServicer
from services.watches import WatchRegistry
from services.watches_spec import FiredEvent, WatchRecord, WatchReport
from services.watches_worker import WorkerWatches


class _FlakyStore(InMemoryWatchStore):
    """An in-memory store whose per-watch state reads fail while ``down`` is set (a store losing its link)."""

    down = False

    def state(self, watch_id):
        if self.down:
            raise ConnectionError("the store went away")
        return super().state(watch_id)


def _registry(store: InMemoryWatchStore | None = None, **config) -> WatchRegistry:
    metrics = MosaicMetrics()
    coordinator = Coordinator([], None, metrics)
    coordinator.started = True
    coordinator.placement = {"cam": 0}
    return WatchRegistry(store or InMemoryWatchStore(), coordinator, metrics, load_config(None, **config))


# Events already buffered come back at once; asking for more than there are waits this long for none to come.
BUFFERED_S = 0.3


def _fired(watch_id: str, end_s: float) -> FiredEvent:
    now = time.time()
    return FiredEvent(watch_id=watch_id, stream_id="cam", cluster_id=f"cam/c{int(end_s):06d}", start_s=end_s - 1,
                      end_s=end_s, score=2.0, answer="a truck", answer_error="", sealed_unix_s=now - 0.5,
                      fired_unix_s=now)  # fmt: skip


async def _take(registry: WatchRegistry, watch_ids: list[str], after: int | None, count: int, wait_s=2.0) -> list:
    """Up to ``count`` events, or those that came within ``wait_s``."""
    got = []
    events = registry.subscribe(watch_ids, after)
    try:
        async with asyncio.timeout(wait_s):
            async for item in events:
                got.append(item)
                if len(got) == count:
                    break
    except TimeoutError:
        pass
    finally:
        await events.aclose()
    return got


def test_resume_gap_and_deletion():
    async def run():
        registry = _registry(watch_event_buffer=3)
        await registry.create(WatchRecord(watch_id="w", question="Truck?", stream_ids=["cam"]))
        for end_s in range(1, 4):
            await registry._record(_fired("w", float(end_s)))
        first = await _take(registry, ["w"], 0, 2)
        assert [i.payload["end_s"] for i in first] == [1.0, 2.0] and not any(i.missed_before for i in first)
        rest = await _take(registry, ["w"], first[-1].event_id, 10, wait_s=BUFFERED_S)
        assert [i.payload["end_s"] for i in rest] == [3.0]
        # Nobody follows "w" now: three more events push the resume point out of the 3-event buffer.
        for end_s in range(4, 7):
            await registry._record(_fired("w", float(end_s)))
        dropped = registry.metrics.events_dropped_total.labels("buffer_full")._value.get()
        assert dropped == 3
        resumed = await _take(registry, ["w"], first[-1].event_id, 10, wait_s=BUFFERED_S)
        assert [i.payload["end_s"] for i in resumed] == [4.0, 5.0, 6.0]
        assert [i.missed_before for i in resumed] == [True, False, False]
        # A live subscriber (from now on) sees the next event, and ends when its watch is deleted.
        live = asyncio.create_task(_take(registry, ["w"], None, 2))
        await asyncio.sleep(0.1)
        await registry._record(_fired("w", 7.0))
        # Trimmed events are counted while someone follows the watch too.
        assert registry.metrics.events_dropped_total.labels("buffer_full")._value.get() == 4
        await asyncio.sleep(0.1)  # the subscriber reads it; deleting the watch drops what is still buffered
        await registry.delete("w")
        got = await live
        assert [i.payload["end_s"] for i in got] == [7.0]
        assert got[0].payload["question"] == "Truck?"

    asyncio.run(run())


def test_status_code_errors():
    async def run():
        registry = _registry(max_watches=1, max_watch_subscribers=1)
        with pytest.raises(NotFoundError, match="unknown stream 'nope'"):
            await registry.create(WatchRecord(watch_id="w", question="q", stream_ids=["nope"]))
        with pytest.raises(InvalidArgumentError, match="allows no webhooks"):
            await registry.create(WatchRecord(watch_id="w", question="q", webhook_url="https://x/y"))
        await registry.create(WatchRecord(watch_id="w", question="q"))
        with pytest.raises(AlreadyExistsError):
            await registry.create(WatchRecord(watch_id="w", question="q"))
        with pytest.raises(CapacityError, match="max_watches"):
            await registry.create(WatchRecord(watch_id="w2", question="q"))
        with pytest.raises(NotFoundError, match="unknown watch"):
            await registry.delete("w2")
        with pytest.raises(NotFoundError, match="unknown watch"):
            await anext(registry.subscribe(["w2"], None))
        with pytest.raises(InvalidArgumentError, match="after_event_id"):
            await anext(registry.subscribe([], -1))
        holder = asyncio.create_task(_take(registry, [], None, 1))
        await asyncio.sleep(0.1)
        with pytest.raises(CapacityError, match="subscribers"):
            await anext(registry.subscribe([], None))
        await registry._record(_fired("w", 1.0))
        assert len(await holder) == 1
        assert registry.metrics.subscribers._value.get() == 0

    asyncio.run(run())


# 1000 characters (CreateWatch's own limit) but 1006 tokens once the engine wraps the question in its chat template
EMOJI_QUESTION = "\N{GRINNING FACE}" * 1000


def test_a_question_longer_than_the_engine_takes_is_refused_and_not_stored():
    """Ask refuses such a question; a watch with it used to be stored, and every event it fired carried the
    engine's refusal as its answer_error."""

    async def run():
        registry = _registry()
        with pytest.raises(InvalidArgumentError, match="the question is 1006 tokens long; the limit is 512"):
            await registry.create(WatchRecord(watch_id="long", question=EMOJI_QUESTION, stream_ids=["cam"]))
        assert registry.store.list_watches() == [] and registry._records == {}
        await registry.create(WatchRecord(watch_id="short", question="\N{GRINNING FACE}" * 200))  # 206 tokens

    asyncio.run(run())


def test_a_stored_watch_past_the_token_limit_does_not_break_a_restart(caplog):
    """Watches created before CreateWatch counted tokens are loaded as they are, and named in the log."""

    async def run():
        store = InMemoryWatchStore()
        store.put_watch(WatchRecord(watch_id="old-long", question=EMOJI_QUESTION))
        store.put_watch(WatchRecord(watch_id="old-short", question="Truck?"))
        registry = _registry(store)
        await registry.start()
        try:
            assert sorted(registry._records) == ["old-long", "old-short"]
        finally:
            await registry.stop_polls()
            await registry.close()

    asyncio.run(run())
    assert "watch 'old-long'" in caplog.text and "1006 tokens long; the limit is 512" in caplog.text
    assert "old-short" not in caplog.text


def test_a_committed_change_is_not_reported_as_failed_and_the_reload_loop_survives(monkeypatch, caplog):
    """Handing workers the list fails after the store took the change: the call succeeds and the failure is
    logged; the reload loop logs the same failure and keeps following the store."""
    monkeypatch.setattr("services.watches.RELOAD_INTERVAL_S", 0.01)

    async def run():
        store = _FlakyStore()
        registry = _registry(store)
        store.down = True
        await registry.create(WatchRecord(watch_id="w", question="Truck?", stream_ids=["cam"]))
        assert [r.watch_id for r in store.list_watches()] == ["w"]
        await registry.delete("w")
        assert store.list_watches() == []
        reload = asyncio.create_task(registry._reload_loop())
        store.put_watch(WatchRecord(watch_id="other", question="Van?"))  # another router's watch
        await asyncio.sleep(0.2)  # every reload fails in sync_workers while the store is down
        assert not reload.done()
        store.down = False
        store.put_watch(WatchRecord(watch_id="third", question="Bus?"))
        await asyncio.sleep(0.2)
        assert set(registry._records) == {"other", "third"}
        reload.cancel()

    asyncio.run(run())
    assert "handing the workers the new list failed" in caplog.text
    assert "reloading watches from the store failed" in caplog.text


def test_limits_hold_for_concurrent_calls():
    """Both checks come before an await (the store write, the cursor read); concurrent calls must not both pass."""

    async def run():
        registry = _registry(max_watches=1, max_watch_subscribers=1)
        results = await asyncio.gather(
            registry.create(WatchRecord(watch_id="a", question="Truck?")),
            registry.create(WatchRecord(watch_id="b", question="Van?")),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["CapacityError", "tuple"]
        assert len(registry.store.list_watches()) == 1
        results = await asyncio.gather(_take(registry, [], None, 1, wait_s=BUFFERED_S),
                                       _take(registry, [], None, 1, wait_s=BUFFERED_S),
                                       return_exceptions=True)  # fmt: skip
        assert sorted(type(r).__name__ for r in results) == ["CapacityError", "list"]
        assert registry._num_subscribers == 0

    asyncio.run(run())


def test_watches_created_while_a_sync_loads_states_do_not_break_it():
    """A sync awaits the store once per watch; watches created meanwhile used to fail it (zip of unequal lengths)."""

    class _SlowStore(InMemoryWatchStore):
        def state(self, watch_id):
            time.sleep(0.05)
            return super().state(watch_id)

    async def run():
        registry = _registry(_SlowStore())
        await registry.create(WatchRecord(watch_id="a", question="Truck?"))
        sync = asyncio.create_task(registry.sync_workers())
        await asyncio.sleep(0.01)  # the sync is waiting for "a"'s state
        created = asyncio.create_task(registry.create(WatchRecord(watch_id="b", question="Van?")))
        await sync
        await created
        assert sorted(w.watch_id for w in registry.store.list_watches()) == ["a", "b"]

    asyncio.run(run())


def test_a_watch_past_the_token_limit_stored_through_another_router_is_named_once(caplog):
    """A router of a release before the check, sharing the store, stored it: the reload that picks it up names it in
    the log, and the reloads after it, every few seconds, do not name it again."""

    async def run():
        store = InMemoryWatchStore()
        registry = _registry(store)
        await registry.create(WatchRecord(watch_id="short", question="Truck?"))
        store.put_watch(WatchRecord(watch_id="old-long", question=EMOJI_QUESTION))
        await registry._reload()
        assert "old-long" in registry._records
        store.put_watch(WatchRecord(watch_id="other", question="Van?"))  # a later change: old-long is not new then
        await registry._reload()
        await registry._reload()
        assert sorted(registry._records) == ["old-long", "other", "short"]

    asyncio.run(run())
    assert caplog.text.count("watch 'old-long' cannot be answered") == 1
    assert "1006 tokens long; the limit is 512" in caplog.text
    assert "'short'" not in caplog.text and "'other'" not in caplog.text


def test_a_watch_replaced_through_another_router_is_picked_up():
    """Routers sharing a store pick up each other's watches: one deleted and created again under its id elsewhere
    brings its new question (and webhook) here, not only a change in the set of ids."""

    async def run():
        store = InMemoryWatchStore()
        registry = _registry(store)
        await registry.create(WatchRecord(watch_id="gate", question="Is a truck at the gate?"))
        store.delete_watch("gate")
        store.put_watch(WatchRecord(watch_id="gate", question="Is a person at the gate?"))
        await registry._reload()
        assert registry._records["gate"].question == "Is a person at the gate?"

    asyncio.run(run())


def test_close_ends_subscribers():
    async def run():
        registry = _registry()
        await registry.create(WatchRecord(watch_id="w", question="Truck?"))
        events = registry.subscribe([], None)
        waiting = asyncio.create_task(anext(events, None))
        await asyncio.sleep(0.2)
        await registry.close()
        try:
            assert await asyncio.wait_for(waiting, 2.0) is None
        except TimeoutError:
            raise AssertionError("a WatchEvents subscriber was still open 2 s after close()") from None

    asyncio.run(run())


def test_an_event_stored_while_a_subscriber_reads_goes_out_at_once():
    """A wake that comes while a subscriber reads the store (a thread) is not lost until its next timed wake."""

    class _SlowRead(InMemoryWatchStore):
        def events_after(self, watch_id, after_id, limit):
            out = super().events_after(watch_id, after_id, limit)
            time.sleep(0.3)  # a store round trip under load, after the read
            return out

    async def run():
        registry = _registry(_SlowRead())
        await registry.create(WatchRecord(watch_id="w", question="Truck?", stream_ids=["cam"]))
        events = registry.subscribe(["w"], None)
        first = asyncio.create_task(anext(events))
        await asyncio.sleep(0.1)  # inside its first read
        stored_s = time.monotonic()
        await registry._record(_fired("w", 1.0))
        item = await asyncio.wait_for(first, 10)
        waited_s = time.monotonic() - stored_s
        await events.aclose()
        assert item.payload["end_s"] == 1.0
        assert waited_s < 1.5, f"a live event reached its subscriber after {waited_s:.1f} s"

    asyncio.run(run())


def test_a_stream_deleted_leaves_no_cooldown_for_one_created_again_under_its_id():
    """A pulled camera created again starts its clock at 0: its predecessor's last event (at 5,000 s) must not hold
    its first matches back as cooldown, through the cooldowns the router hands the workers."""

    async def run():
        store = InMemoryWatchStore()
        registry = await _watching_trucks(store)
        await registry._record(_of_gate(_fired("w", 5000.0)))
        assert store.state("w").fired_until_s == {"gate": 5000.0}
        await registry.forget_stream("gate")
        assert store.state("w").fired_until_s == {}

    asyncio.run(run())


def test_missed_before_survives_a_batch_filled_by_another_watch():
    """Watch b lost events 251..260 (buffer full) that a subscriber resuming from 0 never read. The first read's
    batch (256 events) is all of watch a's and moves the cursor past b's trimmed_through: b's first event must still
    say that events were missed before it."""

    async def run():
        store = InMemoryWatchStore()
        registry = _registry(store, watch_event_buffer=1000)
        await registry.create(WatchRecord(watch_id="a", question="Truck?", stream_ids=["cam"]))
        await registry.create(WatchRecord(watch_id="b", question="Van?", stream_ids=["cam"]))

        def add(watch_id, n):
            for _ in range(n):
                event = _fired(watch_id, 1.0)
                store.append_event(watch_id, {k: getattr(event, k) for k in FiredEvent.__slots__}, max_events=1000)

        add("a", 250)  # ids 1..250
        add("b", 10)  # ids 251..260, trimmed below
        add("a", 100)  # ids 261..360
        add("b", 1000)  # ids 361..1360: b keeps 1000, trims 251..260
        assert store.state("b").trimmed_through == 260
        got = []
        events = registry.subscribe(["a", "b"], 0)
        async with asyncio.timeout(5):
            async for item in events:
                got.append(item)
                if item.payload["watch_id"] == "b":
                    break
        await events.aclose()
        first_b = got[-1]
        assert first_b.event_id == 361
        assert first_b.missed_before, "b's events 251..260 were never read, but its next event has no missed_before"

    asyncio.run(run())


async def _watching_trucks(store: InMemoryWatchStore) -> WatchRegistry:
    """A registry on ``store`` with one watch, "w", of a minute's cooldown."""
    registry = _registry(store)
    await registry.create(WatchRecord(watch_id="w", question="Truck?", cooldown_s=60.0))
    return registry


def _of_gate(event: FiredEvent, **changes) -> FiredEvent:
    """``event`` as fired on stream "gate"."""
    return dataclasses.replace(event, stream_id="gate", cluster_id="gate/c1", **changes)


async def _cooldowns_cleared(store: InMemoryWatchStore, timeout_s: float = 5.0) -> dict[str, float]:
    """Watch "w"'s cooldowns once none is left, or as they are after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while store.state("w").fired_until_s and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return store.state("w").fired_until_s


class _HeldCall:
    """Stands in for one method of a worker's Ray handle in ``coordinator.workers``: ``<method>.remote(...)``
    returns ``result`` once ``release`` is set (``called`` is set as it is called), so a test can act while the
    call is on its way."""

    def __init__(self, method: str, result):
        self.result = result
        self.called = asyncio.Event()
        self.release = asyncio.Event()
        setattr(self, method, self)

    def remote(self, *args):
        async def call():
            self.called.set()
            await self.release.wait()
            return self.result

        return call()


def test_an_event_taken_before_its_stream_was_deleted_is_stored_without_its_cooldown():
    """The worker reported the deleted stream's event before it forgot the stream; the router stores it after
    DeleteStream cleared the cooldowns. The event stays, the cooldown must not come back."""

    async def run():
        store = InMemoryWatchStore()
        registry = await _watching_trucks(store)
        gate = _of_gate(_fired("w", 5000.0))
        yard = dataclasses.replace(_fired("w", 7.0), stream_id="yard", cluster_id="yard/c1")
        held = _HeldCall("take_watch_events", WatchReport(events=[gate, yard]))
        registry.coordinator.workers = [held]
        drain = asyncio.create_task(registry.drain(0))
        await asyncio.wait_for(held.called.wait(), 5)
        await registry.forget_stream("gate")
        held.release.set()
        await asyncio.wait_for(drain, 5)
        state = store.state("w")
        assert state.fired_until_s == {"yard": 7.0}  # only the deleted stream's cooldown is left out
        assert [e["stream_id"] for _, e in store.events_after("w", 0, 10)] == ["gate", "yard"]

    asyncio.run(run())


class _HeldAppend(InMemoryWatchStore):
    """An in-memory store whose ``append_event`` waits for ``release`` (a slow store write)."""

    def __init__(self):
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def append_event(self, watch_id, event, **kwargs):
        self.entered.set()
        assert self.release.wait(10), "the test never released the write"
        return super().append_event(watch_id, event, **kwargs)


async def _forget_while_a_cooldown_write_is_held(store: _HeldAppend) -> tuple[asyncio.Task, asyncio.Task]:
    """Stores an event of stream "gate" whose write ``store`` holds, and starts forgetting "gate" meanwhile;
    returns the two tasks, the forget under way."""
    registry = await _watching_trucks(store)
    gate = _of_gate(_fired("w", 5000.0))
    record = asyncio.create_task(registry._record(gate))
    assert await asyncio.to_thread(store.entered.wait, 5)
    forget = asyncio.create_task(registry.forget_stream("gate"))
    await asyncio.sleep(0.1)  # the forget waits for the held write
    return record, forget


def test_a_stream_forgotten_while_its_cooldown_is_being_written_stays_forgotten():
    async def run():
        store = _HeldAppend()
        record, forget = await _forget_while_a_cooldown_write_is_held(store)
        store.release.set()
        await asyncio.wait_for(asyncio.gather(record, forget), 5)
        assert store.state("w").fired_until_s == {} and store.state("w").num_events == 1

    asyncio.run(run())


def test_an_event_its_worker_marked_as_of_a_deleted_stream_is_stored_and_sent_without_its_cooldown():
    async def run():
        store = InMemoryWatchStore()
        registry = await _watching_trucks(store)
        gate = _of_gate(_fired("w", 5000.0), sets_cooldown=False)
        yard = dataclasses.replace(_fired("w", 7.0), stream_id="yard", cluster_id="yard/c1")
        registry.coordinator.workers = [_HeldCall("take_watch_events", WatchReport(events=[gate, yard]))]
        registry.coordinator.workers[0].release.set()
        await asyncio.wait_for(registry.drain(0), 5)
        assert store.state("w").fired_until_s == {"yard": 7.0}
        stored = [e for _, e in store.events_after("w", 0, 10)]
        assert [e["stream_id"] for e in stored] == ["gate", "yard"]
        assert all("sets_cooldown" not in e for e in stored)  # worker-to-router bookkeeping, not part of the event

    asyncio.run(run())


def test_a_delete_stream_cancelled_while_a_cooldown_write_is_under_way_still_clears_the_cooldown():
    """DeleteStream's client may go away while the forget waits for a write of the stream's cooldown; the
    stream's placement is gone by then, so the forget must still clear the store."""

    async def run():
        store = _HeldAppend()
        record, forget = await _forget_while_a_cooldown_write_is_held(store)
        forget.cancel()
        store.release.set()
        await asyncio.wait_for(record, 5)
        assert await _cooldowns_cleared(store) == {}

    asyncio.run(run())


def test_a_delete_stream_whose_client_goes_away_still_clears_the_streams_cooldowns():
    """The worker deletes the stream whatever the client does; the router must then forget its cooldowns too."""

    async def run():
        store = InMemoryWatchStore()
        registry = await _watching_trucks(store)
        await registry._record(_of_gate(_fired("w", 5000.0)))
        assert store.state("w").fired_until_s == {"gate": 5000.0}
        worker = _HeldCall("close_stream", 3)
        registry.coordinator.workers, registry.coordinator.placement = [worker], {"gate": 0}
        queue, metrics = QueryQueue(max_waiting=4, max_running=1), registry.coordinator.metrics
        servicer = MosaicServicer(
            registry.coordinator, queue, metrics, mode="cluster", default_max_new_tokens=8, max_push_calls=4
        )
        servicer.watches = registry
        delete = asyncio.create_task(servicer.DeleteStream(pb.DeleteStreamRequest(stream_id="gate"), context=None))
        await asyncio.wait_for(worker.called.wait(), 5)
        delete.cancel()  # the client went away
        worker.release.set()
        assert await _cooldowns_cleared(store) == {}
        assert "gate" not in registry.coordinator.placement

    asyncio.run(run())


class _HeldAnswers:
    """An engine loop whose background queue keeps each watch answer until the test finishes it."""

    def __init__(self) -> None:
        self.jobs = []
        self.questions = self

    def submit_background(self, job) -> bool:
        self.jobs.append(job)
        return True

    def post(self, fn, **kwargs) -> Future:
        done = Future()
        done.set_result(fn(**kwargs))
        return done


def test_an_answer_of_a_deleted_watch_is_not_stored_under_one_created_again_with_its_id():
    """Watches have no update: a user changes one by deleting it and creating it again under its id (docs/watches.md
    says so for a question past the limit). An event the old watch fired, whose answer finishes after that (answers
    wait seconds for an idle engine), belongs to the old question: it must not be stored, delivered and counted as the
    new watch's, nor hold the new watch back with the old one's cooldown, on the router or on the worker."""

    async def run():
        registry = _registry()
        await registry.create(WatchRecord(watch_id="w", question="Is a truck at the gate?", stream_ids=["cam"],
                                          created_s=time.time()))  # fmt: skip
        engine = SimpleNamespace(streams={"cam": None}, spec=SimpleNamespace(num_layers=2))
        loop = _HeldAnswers()
        worker = WorkerWatches(engine, loop, retention_s=lambda stream_id: 0.0)
        worker.set_watches([r.for_worker({}) for r in registry.records()])
        old = worker._specs["w"]
        first = SealedSpan("cam/c000001", "cam", 0.0, 10.0)
        assert worker._passes(old, "cam", first)
        worker._answer(old, first, 2.0, time.time(), worker._incarnations.setdefault("cam", object()))

        # Deleted and created again, here or through another router: the worker may get the new list at once.
        await registry.delete("w")
        await registry.create(WatchRecord(watch_id="w", question="Is a bus at the gate?", stream_ids=["cam"],
                                          cooldown_s=60.0, created_s=time.time()))  # fmt: skip
        worker.set_watches([r.for_worker({}) for r in registry.records()])
        job = loop.jobs.pop()
        job.on_finish(job, None)  # the old watch's answer ends now
        await registry._absorb(worker.take(0.0))
        assert registry.store.events_after("w", 0, 10) == []
        assert registry.store.state("w").num_events == 0 and registry.store.state("w").fired_until_s == {}
        # The new watch's first match, 5 s after the old watch's event, is not its cooldown.
        assert worker._passes(worker._specs["w"], "cam", SealedSpan("cam/c000002", "cam", 15.0, 20.0))

    asyncio.run(run())
