"""Watch evaluation inside a real worker (engine loop, engine, durable history), without Ray or gRPC."""

from __future__ import annotations

import threading
import time

import pytest

from mosaic_core.engine.engine import Engine
from mosaic_core.engine.maintenance import merge_clusters
from services.config import load_config
from services.metadata import InMemoryMetadataStore, StreamRecord
from services.watches_spec import ActiveHours, WatchRecord
from services.worker import WorkerCore

FPS = 2.0


def _config(tmp_path, **fields):
    return load_config(
        None,
        **fields,
        data_dir=str(tmp_path / "history"),
        ingest_headroom=0.0,
        ingest_queue_frames=64,
        engine={
            "target_tokens_per_frame": 16,
            "local_window_tokens": 64,
            "retrieval_budget_tokens": 128,
            "formation": {"max_tokens": 64, "min_similarity": 1.0},  # a cluster per frame; two fit one merge
        },
    )


@pytest.fixture
def worker(request, tiny_model, tmp_path):
    """A worker over the tiny preset; ``indirect`` parametrisation passes config fields over these."""
    config = _config(tmp_path, **getattr(request, "param", {}))
    worker = WorkerCore(
        "0", config, store=InMemoryMetadataStore(), engine=Engine(tiny_model, config.engine_config())
    ).wait_started(60)
    yield worker
    worker.shutdown()


def _watch(watch_id: str, stream_ids: list[str], **fields):
    fields = {"threshold": -1e9, "cooldown_s": 0.0, "max_answer_tokens": 2, **fields}
    return WatchRecord(watch_id=watch_id, question="Is anyone there?", stream_ids=stream_ids, **fields).for_worker({})


def _push(worker: WorkerCore, stream_id: str, frames, *, wait: bool = True) -> None:
    before = worker.telemetry.totals(stream_id).ingested
    result = worker.push([(i, stream_id, t, rgb) for i, (t, rgb) in enumerate(frames)])
    assert result.accepted == len(frames) and not result.rejected
    if not wait:
        return
    deadline = time.monotonic() + 90
    while worker.telemetry.totals(stream_id).ingested < before + len(frames):
        assert time.monotonic() < deadline, "frames were not ingested"
        time.sleep(0.05)


def _events(worker: WorkerCore, count: int, timeout_s: float = 60.0) -> list:
    events, deadline = [], time.monotonic() + timeout_s
    while len(events) < count and time.monotonic() < deadline:
        events += worker.take_watch_events(0.5).events
    return events


def test_every_sealed_cluster_is_evaluated_once_and_a_merge_never_refires(worker, bikes_frames):
    worker.open_stream(StreamRecord(stream_id="cam", fps=FPS))
    worker.set_watches([_watch("all", ["cam"])])
    _push(worker, "cam", [(i / FPS, rgb) for i, (_, rgb) in enumerate(bikes_frames[:16])])
    sealed = worker.loop.call(worker.engine.clusters, "cam")[:-1]
    assert len(sealed) >= 3
    events = _events(worker, len(sealed))
    assert [(e.start_s, e.end_s) for e in events] == [(c.start_s, c.end_s) for c in sealed]
    assert all(e.answer and not e.answer_error for e in events)  # each answered by the low-priority decode
    report = worker.take_watch_events(0.0)
    assert report.num_evaluations == 0 and not report.events  # counts were handed over with the events

    state = worker.engine.stream("cam")
    merged = worker.loop.call(merge_clusters, worker.engine, state, sealed[0].cluster_id, sealed[1].cluster_id)
    assert merged in {c.cluster_id for c in worker.loop.call(worker.engine.clusters, "cam")}
    _push(worker, "cam", [((16 + i) / FPS, rgb) for i, (_, rgb) in enumerate(bikes_frames[16:22])])
    newly_sealed = [c for c in worker.loop.call(worker.engine.clusters, "cam")[:-1] if c.start_s > sealed[-1].end_s]
    later = _events(worker, len(newly_sealed), timeout_s=30) + worker.take_watch_events(1.0).events
    assert [(e.start_s, e.end_s) for e in later] == [(c.start_s, c.end_s) for c in newly_sealed]
    assert worker.watches.watermark_of("cam") == newly_sealed[-1].end_s


def test_cooldown_active_hours_and_other_streams_watches_suppress_and_are_counted(worker, bikes_frames):
    """Frames are stamped 0-7 s: 00:00 UTC on 1970-01-01, outside 12:00-13:00 and inside 23:00-01:00."""
    worker.open_stream(StreamRecord(stream_id="cam", fps=FPS))
    worker.set_watches([
        _watch("quiet", ["cam"], cooldown_s=1e6, active_hours=ActiveHours("23:00", "01:00")),
        _watch("noon", ["cam"], active_hours=ActiveHours("12:00", "13:00")),
        _watch("elsewhere", ["other-cam"]),
    ])  # fmt: skip
    _push(worker, "cam", [(i / FPS, rgb) for i, (_, rgb) in enumerate(bikes_frames[:14])])
    num_sealed = len(worker.loop.call(worker.engine.clusters, "cam")) - 1
    assert num_sealed >= 3
    reports, deadline = [], time.monotonic() + 60
    while sum(len(r.events) for r in reports) < 1 and time.monotonic() < deadline:
        reports.append(worker.take_watch_events(0.5))
    reports.append(worker.take_watch_events(0.5))
    assert [e.watch_id for r in reports for e in r.events] == ["quiet"]
    assert sum(r.num_evaluations for r in reports) == 2 * num_sealed  # "elsewhere" does not watch this camera
    assert sum(r.suppressed.get("cooldown", 0) for r in reports) == num_sealed - 1
    assert sum(r.suppressed.get("outside_hours", 0) for r in reports) == num_sealed
    assert len([s for r in reports for s in r.score_seconds]) == num_sealed


def test_active_hours_of_a_pulled_camera_are_judged_on_its_clock_plus_its_epoch(worker, bikes_frames):
    """A pulled source's clock starts at 0; the worker records the wall-clock time it read 0 (its epoch)."""
    worker.open_stream(StreamRecord(stream_id="cam", fps=FPS))
    worker.sessions["cam"].clock_epoch_unix = 12.5 * 3600  # the stream's 0 s is 12:30 UTC on 1970-01-01
    worker.set_watches([_watch("noon", ["cam"], active_hours=ActiveHours("12:00", "13:00"))])
    _push(worker, "cam", [(i / FPS, rgb) for i, (_, rgb) in enumerate(bikes_frames[:8])])
    num_sealed = len(worker.loop.call(worker.engine.clusters, "cam")) - 1
    assert num_sealed >= 1
    events = _events(worker, num_sealed)
    assert [e.watch_id for e in events] == ["noon"] * num_sealed
    assert not worker.take_watch_events(0.0).suppressed.get("outside_hours")


def test_clusters_whose_scoring_raised_are_counted_as_dropped(worker, bikes_frames):
    worker.open_stream(StreamRecord(stream_id="cam", fps=FPS))
    worker.set_watches([_watch("a", ["cam"]), _watch("b", ["cam"])])

    def score_fails(*args, **kwargs):
        raise RuntimeError("injected scoring failure")

    worker.watches.scorer.score = score_fails  # a failure inside the real scorer would look the same here
    _push(worker, "cam", [(i / FPS, rgb) for i, (_, rgb) in enumerate(bikes_frames[:8])])
    num_sealed = len(worker.loop.call(worker.engine.clusters, "cam")) - 1
    assert num_sealed >= 1
    report = worker.take_watch_events(0.0)
    assert not report.events
    assert report.dropped == {"score_failed": 2 * num_sealed}


def test_set_watches_does_not_wait_for_a_busy_engine_thread(worker):
    """The router waits a few seconds for each worker to take the list; the engine thread may be busy longer."""
    worker.set_watches([_watch("w", ["cam"])])
    busy = threading.Thread(target=worker.loop.call, args=(time.sleep, 3.0))
    busy.start()
    time.sleep(0.2)  # the engine thread is now in the sleep
    started = time.monotonic()
    worker.set_watches([])  # the question is gone: its cached queries are dropped on the engine thread
    assert time.monotonic() - started < 1.0
    busy.join()
    assert worker.loop.call(lambda: worker.watches.scorer.cache_bytes) == 0


def test_a_restart_without_a_saved_watermark_evaluates_the_newest_cluster_and_a_deleted_stream_is_forgotten(
    worker, bikes_frames
):
    worker.open_stream(StreamRecord(stream_id="cam", fps=FPS))
    _push(worker, "cam", [(i / FPS, rgb) for i, (_, rgb) in enumerate(bikes_frames[:8])])
    clusters = worker.loop.call(worker.engine.clusters, "cam")
    assert len(clusters) >= 2
    worker.loop.call(worker.watches.restore_watermark, "cam", None)
    # The newest cluster was still growing; it is evaluated once it is sealed, so the mark stays before it.
    assert worker.watches.watermark_of("cam") == clusters[-2].end_s
    spec = WatchRecord(watch_id="w", question="Is anyone there?", stream_ids=["cam"]).for_worker({"cam": 3.0})
    worker.set_watches([spec])
    assert ("w", "cam") in worker.watches._fired_until
    worker.loop.call(worker.watches.forget_stream, "cam")
    assert ("w", "cam") not in worker.watches._fired_until and worker.watches.watermark_of("cam") is None


def test_the_routers_cooldowns_apply_only_to_streams_this_worker_restored(worker, bikes_frames):
    """The router hands every worker every watch's cooldowns. A stream held on another worker, or deleted there
    and created again here (its clock from 0), must not find its predecessor's cooldown on this worker, even from
    a sync that read it before the delete; a stream this worker restored after a restart takes it."""
    spec = WatchRecord(watch_id="w", question="Is anyone there?", cooldown_s=60.0).for_worker({"gate": 5000.0})
    worker.set_watches([spec])  # "gate" runs on another worker
    assert ("w", "gate") not in worker.watches._fired_until
    worker.open_stream(StreamRecord(stream_id="gate", fps=FPS))
    worker.set_watches([spec])  # created here: the router's value is a deleted predecessor's
    assert ("w", "gate") not in worker.watches._fired_until
    worker.loop.call(worker.watches.restore_watermark, "gate", None)  # as the worker's restore does
    worker.set_watches([spec])
    assert worker.watches._fired_until[("w", "gate")] == 5000.0


# With no answer slice the question advances one token per ingest pass while frames wait, so it outlasts the
# watched camera's passes (two frames each) on any machine, however fast the tiny model decodes.
@pytest.mark.parametrize("worker", [{"answer_slice_s": 0.0}], indirect=True)
def test_watch_answers_wait_for_interactive_questions(worker, bikes_frames):
    """Seals of one camera are scored while a question about another runs; their answers start only after it."""
    for stream_id in ("asked", "watched"):
        worker.open_stream(StreamRecord(stream_id=stream_id, fps=FPS))
    _push(worker, "asked", [(i / FPS, rgb) for i, (_, rgb) in enumerate(bikes_frames[:6])])
    worker.set_watches([_watch("w", ["watched"])])
    finished = {}

    def ask() -> None:
        for _ in worker.ask("q1", "asked", "Describe everything in detail.", 48, None, 120.0):
            pass
        finished["at"] = time.time()

    _push(worker, "watched", [(i / FPS, rgb) for i, (_, rgb) in enumerate(bikes_frames[:14])], wait=False)
    asker = threading.Thread(target=ask)
    asker.start()
    asker.join(120)
    events = _events(worker, 1)
    assert events, "no watch event"
    early = [e for e in events if e.sealed_unix_s < finished["at"]]
    assert early, "no cluster sealed while the question ran; make the question longer"
    assert all(e.fired_unix_s > finished["at"] for e in early)


def test_a_shutdown_hands_over_every_event_it_cut_short(tiny_model, bikes_frames, tmp_path):
    config = load_config(
        None,
        data_dir=str(tmp_path / "history"),
        ingest_headroom=0.0,
        ingest_queue_frames=64,
        engine={"target_tokens_per_frame": 16, "local_window_tokens": 64, "retrieval_budget_tokens": 128},
    )
    worker = WorkerCore(
        "0", config, store=InMemoryMetadataStore(), engine=Engine(tiny_model, config.engine_config())
    ).wait_started(60)
    worker.open_stream(StreamRecord(stream_id="cam", fps=FPS))
    worker.set_watches([_watch("all", ["cam"], max_answer_tokens=64)])  # long answers: most are still queued
    _push(worker, "cam", [(i / FPS, rgb) for i, (_, rgb) in enumerate(bikes_frames[:16])])
    evaluated = worker.watches.watermark_of("cam")
    num_sealed = len([c for c in worker.loop.call(worker.engine.clusters, "cam") if c.end_s <= evaluated])
    early = worker.take_watch_events(0.0).events
    worker.shutdown()
    late = worker.take_watch_events(0.0).events
    assert len(early) + len(late) == num_sealed  # answered, or handed over with the reason it was not
    assert any("shutting down" in e.answer_error for e in late)


def _fire_again(worker: WorkerCore, stream_id: str) -> int:
    """On the engine thread: evaluates every sealed cluster of the stream again (its watermark rewound), which
    queues one background answer per cluster; returns how many clusters fired."""
    worker.watches.restore_watermark(stream_id, float("-inf"))
    worker.watches.on_ingested([stream_id])
    return len(worker.engine.clusters(stream_id)) - 1


def test_a_deleted_streams_unreported_events_still_go_out_without_their_cooldown(worker, bikes_frames):
    """Events of a stream still in the outbox when it is deleted fired before the delete: the router still gets
    them, marked so that it does not store the deleted stream's cooldown, which a stream created again under the
    id would inherit. Another stream's events keep theirs."""
    worker.open_stream(StreamRecord(stream_id="cam", fps=FPS))
    worker.open_stream(StreamRecord(stream_id="yard", fps=FPS))
    _push(worker, "cam", [(i / FPS, rgb) for i, (_, rgb) in enumerate(bikes_frames[:8])])
    _push(worker, "yard", [(i / FPS, rgb) for i, (_, rgb) in enumerate(bikes_frames[:8])])
    worker.set_watches([_watch("w", [])])
    fired = worker.loop.call(lambda: {s: _fire_again(worker, s) for s in ("cam", "yard")})
    assert fired["cam"] >= 2 and fired["yard"] >= 2
    worker.close_stream("cam")  # its answers are cut short or done: either way their events wait in the outbox
    events, deadline = [], time.monotonic() + 60
    while len(events) < sum(fired.values()) and time.monotonic() < deadline:
        events += worker.take_watch_events(0.5).events
    setting = sorted((e.stream_id, e.sets_cooldown) for e in events)
    assert setting == [("cam", False)] * fired["cam"] + [("yard", True)] * fired["yard"]


def test_an_answer_that_ends_after_its_stream_was_forgotten_goes_out_without_its_cooldown(worker, bikes_frames):
    """The incarnation check of the outbox: answers queued before ``forget_stream`` run after it (the stream's
    engine state is left in place here), and their events must not carry the forgotten stream's cooldown."""
    worker.open_stream(StreamRecord(stream_id="cam", fps=FPS))
    _push(worker, "cam", [(i / FPS, rgb) for i, (_, rgb) in enumerate(bikes_frames[:8])])
    worker.set_watches([_watch("w", ["cam"])])

    def fire_then_forget() -> int:
        fired = _fire_again(worker, "cam")  # answers queued, not started: this holds the engine thread
        worker.watches.forget_stream("cam")
        return fired

    fired = worker.loop.call(fire_then_forget)
    assert fired >= 2
    events, deadline = [], time.monotonic() + 60
    while len(events) < fired and time.monotonic() < deadline:
        events += worker.take_watch_events(0.5).events
    assert [e.sets_cooldown for e in events] == [False] * fired


def test_clusters_sealed_before_a_restarted_workers_first_watch_list_are_scored_against_it(
    tiny_model, bikes_frames, tmp_path
):
    """A restarted worker starts with no watches; the router's list comes a second or more later. The clusters
    sealed in between, the shutdown's checkpoint among them, are scored once it comes, not skipped."""
    config = _config(tmp_path)
    store = InMemoryMetadataStore()
    frames = [(i / FPS, rgb) for i, (_, rgb) in enumerate(bikes_frames[:16])]
    worker = WorkerCore("0", config, store=store, engine=Engine(tiny_model, config.engine_config())).wait_started(60)
    worker.open_stream(StreamRecord(stream_id="cam", fps=FPS))
    worker.set_watches([_watch("w", ["cam"])])
    _push(worker, "cam", frames[:6])
    worker.drain_telemetry()
    worker.shutdown()
    worker = WorkerCore("0", config, store=store, engine=Engine(tiny_model, config.engine_config())).wait_started(60)
    try:
        mark = worker.watches.watermark_of("cam")
        _push(worker, "cam", frames[6:12])  # sealed while the router's list is on its way
        gap = [c for c in worker.loop.call(worker.engine.clusters, "cam")[:-1] if c.start_s > mark]
        assert gap
        worker.set_watches([_watch("w", ["cam"])])
        _push(worker, "cam", frames[12:16])
        fired = {(e.start_s, e.end_s) for e in _events(worker, len(gap) + 2, timeout_s=30)}
        assert {(c.start_s, c.end_s) for c in gap} <= fired
    finally:
        worker.shutdown()
