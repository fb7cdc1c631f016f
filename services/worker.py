"""A GPU worker: one engine and the stream sessions placed on it (a Ray actor through ``services.worker_actor``).

``WorkerCore`` is plain Python (tests can build it in-process, then ``wait_started``). Its constructor returns at once
and its start (engine, restore) runs on a thread of its own (``services.worker_start``): until it is done the worker
answers ``start_state`` and refuses its other calls (``shutdown`` stops at once). Inside, one engine thread
(``EngineLoop``) does all engine work; producers (PushFrames calls, source readers) only touch the bounded,
drop-oldest ingest queues. Its streams are opened, closed and restored by ``WorkerStreams``, its questions asked
through ``WorkerQuestions``.

**The worker is the truth about its streams.** Its engine keeps every stream, and every sealed cluster, in the
worker's data directory (``mosaic_core.durable``). When Ray restarts a dead worker (``max_restarts``), or a new
server starts on the same data directory, its start re-opens every stream found there with its record (fps, source,
retention, labels), re-adopts its sealed clusters, and resumes pulling sources with the clock continuing past the
last recorded frame. The metadata store is an index that ``MetadataPublisher`` rebuilds from the worker, never the
other way round.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import numpy as np

from mosaic_core.engine import stream_lifecycle
from mosaic_core.engine.keyframes import Keyframe
from mosaic_core.errors import ConfigError, StateError
from services import gc_watch, gil_probe, heap_probe, stack_probe
from services.config import ServiceConfig
from services.engine_loop import service_loop
from services.gone_workers import delete_history_of_gone_worker
from services.ingest_queue import IngestQueues
from services.load_watch import rss_bytes
from services.metadata.base import MetadataStore, StreamRecord
from services.preflight import unserved_history_problem
from services.publisher import MetadataPublisher, WorkerView
from services.session import StreamSession
from services.store_actor import connect_store
from services.telemetry import TelemetryDelta, WorkerTelemetry
from services.tier_sync import TierSync
from services.watches_spec import WatchReport, WatchSpec
from services.watches_worker import WorkerWatches
from services.worker_counters import WorkerCounters
from services.worker_engine import build_engine
from services.worker_frames import FrameIntake
from services.worker_questions import WorkerQuestions
from services.worker_results import PushResult, StreamInfo, WorkerInfo
from services.worker_start import StartState, WorkerStart
from services.worker_streams import WorkerStreams

log = logging.getLogger(__name__)
# A stopping worker ingests the frames its sources queued for up to this long, within the time the router gives its
# shutdown (what is left of the pod's grace, services.router), before the checkpoint; frames left then are counted
# dropped (reason shutdown).
SHUTDOWN_INGEST_S = 2.0
# What a shutdown's wait for the engine thread allows past the ingest window and the checkpoint's own wait: the step
# the thread is in when asked, the counters' save and the tier sync's flush. A checkpoint that fails late is then
# logged with its own error (the disk's), not as this wait's end.
SHUTDOWN_MARGIN_S = 10.0
# The engine's close waits this long for its history's writer to finish (DurableStore.close), or after a failed
# checkpoint only this long: that checkpoint waited its own bound for the same writes already.
STORE_CLOSE_S = 60.0
STORE_CLOSE_AFTER_FAILURE_S = 5.0
SOURCES_STOP_S = 2.0  # at shutdown, the time the source readers get to stop, all together (they are daemons)


def shutdown_wait_s() -> float:
    """How long a shutdown waits for its ingest and checkpoint: the bounds of both, and ``SHUTDOWN_MARGIN_S``."""
    return SHUTDOWN_INGEST_S + stream_lifecycle.CHECKPOINT_WAIT_S + SHUTDOWN_MARGIN_S


class WorkerCore:
    """Engine, streams, queues and metadata sync of one worker.

    Args:
        worker_id: worker index ("0", "1", ...).
        config: service settings (engine budgets, queue sizes, store).
        store: the metadata store; None connects to ``config.redis_url`` (a Redis client does not pickle,
            so Ray workers connect themselves; the in-memory store actor's proxy is passed in).
        engine: a ready engine (tests); built from ``config`` when None.
    """

    def __init__(self, worker_id: str, config: ServiceConfig, store: MetadataStore | None = None, engine=None) -> None:
        self.worker_id = worker_id
        self.config = config
        sys.setswitchinterval(config.python_switch_interval_s)
        heap_probe.start(f"worker-{worker_id}")
        gil_probe.start(f"worker-{worker_id}")
        if store is None and not config.redis_url:
            raise ConfigError("a worker needs a metadata store: pass one, or set redis_url")
        # As ``mosaic serve``'s preflight does, which a router joined to a Ray cluster skips: it sees no worker folder.
        if config.data_dir and (problem := unserved_history_problem(config.data_dir, config.workers)):
            raise ConfigError(problem)
        self.restored_streams: list[str] = []
        self.restore_s = 0.0
        # Ray holds every call to an actor until its constructor returns: the start runs on a thread of its own, and
        # the router asks ``start_state`` how far it has come (``services.worker_start``).
        self._start = WorkerStart(worker_id)
        self._start.run(lambda: self._start_up(store, engine))

    def _start_up(self, store: MetadataStore | None, engine) -> None:
        """The start's thread: connects the store, builds the engine and the worker's parts, restores the streams."""
        if store is None:
            self._start.stage("connecting to the metadata store")
            config = self.config
            store = connect_store(config.redis_url, namespace=config.redis_namespace, timeout_s=config.redis_timeout_s)
        self.store = store
        self._start.stage("building its engine")
        self.engine = engine if engine is not None else build_engine(self.worker_id, self.config, self._start.stage)
        self._assemble()
        self._start.stage("starting its engine thread")
        if self.config.freeze_heap_after_start:  # before any stream: a deleted stream's objects stay collectable
            gc_watch.freeze_once(f"worker {self.worker_id}")
        self.loop.start()
        stack_probe.start(
            f"worker-{self.worker_id}",
            self.loop.thread,
            since_chance=self.loop.questions.seconds_since_chance,
            chance_kind=self.loop.questions.last_chance_kind,
        )
        restore_started_s = time.monotonic()
        self.restored_streams = self.streams.restore(self._start.restore_step)
        self.restore_s = time.monotonic() - restore_started_s
        self._start.stage("starting its metadata publisher")
        self.publisher.start()

    def _assemble(self) -> None:
        """The worker's parts around its engine and store: telemetry, queues, publisher, engine loop, watches,
        questions and streams."""
        config, worker_id = self.config, self.worker_id
        self.telemetry = WorkerTelemetry(worker_id)
        self.queues = IngestQueues(config.ingest_queue_frames)
        self.publisher = MetadataPublisher(
            self.store,
            worker_id,
            self._view,
            stream_ids=self._stream_ids,
            max_queue=config.metadata_queue_size,
            resync_interval_s=config.metadata_resync_interval_s,
        )
        self.tier_sync = TierSync(self.engine, self.publisher, worker_id)
        self.sessions: dict[str, StreamSession] = {}
        self.frames = FrameIntake(config, self.engine, self.queues, self.telemetry, self.sessions)
        self.loop = service_loop(
            self.engine, self.queues, self.tier_sync, self.telemetry, config,
            retention_s=self._retention_s, after_ingest=self._after_ingest,
        )  # fmt: skip
        self.watches = WorkerWatches(
            self.engine,
            self.loop,
            retention_s=self._retention_s,
            clock_epoch_unix=self._clock_epoch_unix,
            max_outbox=config.watch_outbox_size,
            answer_timeout_s=config.watch_answer_timeout_s,
            context_s=config.watch_answer_context_s,
            query_cache_bytes=config.watch_query_cache_bytes,
        )
        self.questions = WorkerQuestions(self.engine, self.loop.questions, self.telemetry, self.sessions)
        self.counters = WorkerCounters(
            self.engine, self.loop, self.queues, self.telemetry, self.publisher, self.watches, self.sessions
        )
        self.streams = WorkerStreams(
            worker_id,
            config,
            self.engine,
            self.loop,
            self.queues,
            self.telemetry,
            self.publisher,
            self.tier_sync,
            self.watches,
            self.sessions,
            self.frames.offer,
        )

    # -- lifecycle ----------------------------------------------------------------------------------
    def start_state(self) -> StartState:
        """How far this worker's start has come (``services.worker_start``); answered while the start runs."""
        return self._start.state

    def wait_started(self, timeout_s: float) -> WorkerCore:
        """For a worker built in-process: waits until its start is done, raising its error if it failed and
        ``TimeoutError`` past ``timeout_s``. Returns the worker, so that building and waiting read as one."""
        self._start.wait(timeout_s)
        return self

    def info(self) -> WorkerInfo:
        """Readiness probe and placement input: free device + host bytes after every reservation."""
        self._start.check_ready()
        stats = self.loop.call(self.engine.stats)  # fresh: the previous placement's reservation must show
        free = sum(max(0, stats.capacity_bytes_by_tier[t] - stats.used_bytes_by_tier[t]) for t in ("device", "host"))
        return WorkerInfo(
            self.worker_id,
            str(self.engine.model.device),
            len(self.sessions),
            free,
            self.restored_streams,
            rss_bytes(),
            os.getpid(),
        )

    def shutdown(self) -> TelemetryDelta | None:
        """Stops sources, ingests what they queued (for up to ``SHUTDOWN_INGEST_S``; what is left is counted as
        dropped, reason ``shutdown``), makes every stream's history durable (open clusters and windows included), and
        lets the publisher finish before the store closes. Returns the telemetry since the last drain, those frames
        included, which no poll will take any more (None if it could not be read, or the start never finished: then
        nothing was served that a checkpoint would keep, and what the start restored is on disk already)."""
        if not self._start.state.ready:
            log.warning("worker %s stops before its start finished (%s)", self.worker_id, self._start.state.text)
            return None
        sources = [session.source for session in list(self.sessions.values()) if session.source is not None]
        for source in sources:  # all at once: each notices within its decoder's poll, which one by one added up
            source.request_stop()
        stopped_by = time.monotonic() + SOURCES_STOP_S  # one wait for all: readers stuck in a lookup or a read
        for source in sources:
            source.stop(timeout_s=max(0.0, stopped_by - time.monotonic()))
        store_close_s = STORE_CLOSE_S
        try:
            self.loop.call(
                self._end_ingest_and_checkpoint, time.monotonic() + SHUTDOWN_INGEST_S, timeout_s=shutdown_wait_s()
            )
        except Exception as err:  # a shutdown still goes on; what was sealed before is on disk
            log.error("worker %s: checkpoint at shutdown failed: %s", self.worker_id, err)
            store_close_s = STORE_CLOSE_AFTER_FAILURE_S  # the writes it waited for will not land now either
        self.publisher.wait_idle(5.0)
        self.publisher.stop()
        self.loop.stop()
        try:
            last = self._telemetry_delta()  # counters are saved already, by the checkpoint's command
        except Exception as err:  # the engine must still close
            log.error("worker %s: its last telemetry could not be read: %s", self.worker_id, err)
            last = None
        self.engine.close(timeout_s=store_close_s)
        self.store.close()
        return last

    def _end_ingest_and_checkpoint(self, deadline_s: float) -> None:
        """Engine thread: no frame is ingested after the checkpoint, whose stream states would not hold it."""
        for stream_id, left in self.loop.ingest_calls.end_ingest(deadline_s).items():
            if stream_id in self.sessions:
                self.telemetry.dropped(stream_id, "shutdown", left)
        self.counters.save()
        try:
            self.engine.checkpoint()  # raises when some window's frames found no room: the others' are durable
        finally:
            self.tier_sync.flush(list(self.engine.streams))

    def _view(self) -> WorkerView:
        """What the metadata store should hold for this worker (called by the publisher's thread)."""

        def collect() -> WorkerView:
            streams = {sid: s.record for sid, s in list(self.sessions.items()) if sid in self.engine.streams}
            return WorkerView(streams, {sid: self.tier_sync.cluster_metas(sid) for sid in streams})

        return self.loop.call(collect)

    def _stream_ids(self) -> list[str]:
        """The ids of ``_view``'s streams, without their clusters (the publisher's drift check)."""
        return self.loop.call(lambda: [sid for sid in list(self.sessions) if sid in self.engine.streams])

    # -- streams ------------------------------------------------------------------------------------
    def open_stream(self, record: StreamRecord) -> None:
        """Opens the stream in the engine and, for a source stream, starts pulling it (``WorkerStreams``)."""
        self._start.check_ready()
        self.streams.open_stream(record)

    def close_stream(self, stream_id: str) -> int:
        """Ends the stream's questions, drops its queued frames, frees its KV and its durable history; returns
        the clusters freed. All or nothing (``WorkerStreams.close_stream``)."""
        self._start.check_ready()
        return self.streams.close_stream(stream_id)

    def delete_gone_workers_history(self, index: int, stream_id: str) -> int:
        """Deletes what worker ``index``, gone for good, kept of ``stream_id`` in the shared data directory, for a
        router that does not see it (``services.gone_workers``); returns its clusters."""
        self._start.check_ready()
        if str(index) == self.worker_id:
            raise StateError(f"worker {self.worker_id} is not gone: its streams are deleted with DeleteStream")
        return delete_history_of_gone_worker(self.config.data_dir, index, stream_id)

    def stream_ids(self) -> list[str]:
        self._start.check_ready()
        return sorted(self.sessions)

    def stream_info(self, stream_id: str) -> StreamInfo:
        self._start.check_ready()
        return self.streams.stream_info(stream_id)

    def keyframes(self, stream_id: str, keyframe_ids: list[str], cluster_id: str, latest: bool) -> list[Keyframe]:
        """A stream's keyframes by ids, by cluster or the newest (``WorkerStreams.keyframes``)."""
        self._start.check_ready()
        return self.streams.keyframes(stream_id, keyframe_ids, cluster_id, latest)

    def stream_infos(self) -> list[StreamInfo]:
        """Every open stream's info, from one engine-thread command (``WorkerStreams.stream_infos``)."""
        self._start.check_ready()
        return self.streams.stream_infos()

    # -- ingest -------------------------------------------------------------------------------------
    def count_dropped(self, stream_id: str, reason: str) -> None:
        """A frame of ``stream_id`` the router dropped before it reached here (a JPEG it could not decode): counted
        in the stream's totals, which GetStream reports and a restart keeps, and in the telemetry the router's metric
        comes from. A stream not open here counts nothing."""
        self._start.check_ready()
        self.frames.count_dropped(stream_id, reason)

    def push(self, frames: list[tuple[int, str, float, np.ndarray | None]]) -> PushResult:
        """Queues decoded frames ``(index in the call, stream, timestamp_s, rgb)``, or decides frames sent without their
        pixels (``rgb`` None); never raises per frame (``FrameIntake.push``)."""
        self._start.check_ready()
        return self.frames.push(frames)

    # -- questions ----------------------------------------------------------------------------------
    def ask(
        self,
        question_id: str,
        stream_id: str,
        question: str,
        max_new_tokens: int,
        time_range,
        timeout_s: float,
        sent_unix: float | None = None,
    ):
        """Streams ``TokenEvent``s then the ``Answer`` (a Ray streaming generator across processes).

        ``timeout_s`` counts from ``sent_unix``, the caller's wall clock when it sent the ask (``WorkerQuestions.ask``).
        """
        self._start.check_ready()
        yield from self.questions.ask(
            question_id, stream_id, question, max_new_tokens, time_range, timeout_s, sent_unix
        )

    def questions_of(self, stream_id: str) -> int:
        """The stream's questions running or waiting on this worker; past ``max_questions_per_stream`` the next is
        refused RESOURCE_EXHAUSTED."""
        self._start.check_ready()
        return self.loop.questions.questions_of(stream_id)

    def cancel(self, question_id: str) -> bool:
        """Stops a question's answer; True when it was here. A cancel that comes before its ask is kept for the ask
        to find (``WorkerQuestions.cancel``)."""
        self._start.check_ready()
        return self.questions.cancel(question_id)

    # -- standing questions -------------------------------------------------------------------------
    def set_watches(self, specs: list[WatchSpec]) -> int:
        """Replaces the watches this worker evaluates (the router sends them all); returns how many."""
        self._start.check_ready()
        self.watches.set_watches(specs)
        return len(specs)

    def take_watch_events(self, wait_s: float) -> WatchReport:
        """Events fired since the last call, waiting up to ``wait_s`` for one (the router long-polls)."""
        self._start.check_ready()
        return self.watches.take(wait_s)

    def _after_ingest(self, stream_ids) -> None:
        self.watches.on_ingested(stream_ids)

    # -- telemetry ----------------------------------------------------------------------------------
    def drain_telemetry(self) -> TelemetryDelta:
        self._start.check_ready()
        delta = self._telemetry_delta()
        self.counters.save()
        return delta

    def _telemetry_delta(self) -> TelemetryDelta:
        return self.counters.delta(restore_s=self.restore_s, streams_restored=len(self.restored_streams))

    def keyframe_stats(self) -> tuple[int, int]:
        """``(keyframe bytes held, keyframes dropped since the previous call)`` from the engine's latest stats."""
        self._start.check_ready()
        return self.counters.keyframe_stats()

    def _clock_epoch_unix(self, stream_id: str) -> float:
        """Unix time at which the stream's clock read 0: a pulled source's clock starts at 0, a pushed one is Unix."""
        session = self.sessions.get(stream_id)
        return 0.0 if session is None or session.clock_epoch_unix is None else session.clock_epoch_unix

    def _retention_s(self, stream_id: str) -> float:
        session = self.sessions.get(stream_id)
        return 0.0 if session is None else session.record.retention_s
