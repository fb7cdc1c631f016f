"""A GPU worker: a Ray actor that owns one engine and the stream sessions placed on it.

``WorkerCore`` is plain Python (tests can build it in-process); ``worker_actor`` wraps it as a Ray actor
with fractional CPU (no GPU here) or ``worker_gpus`` GPUs, ``max_restarts``, threads for answers
(``answer_threads``) and threads of their own for every other call, so answers never hold up frames,
telemetry or cancels. Inside, one engine thread (``EngineLoop``) does all engine work; producers (PushFrames
calls, source readers) only touch the bounded, drop-oldest ingest queues.

**The worker is the truth about its streams.** Its engine keeps every stream, and every sealed cluster, in the
worker's data directory (``mosaic_core.durable``). When Ray restarts a dead worker (``max_restarts``), or a new
server starts on the same data directory, ``__init__`` re-opens every stream found there with its record (fps,
source, retention, labels), re-adopts its sealed clusters, and resumes pulling sources with the clock
continuing past the last recorded frame. The metadata store is an index that ``MetadataPublisher`` rebuilds
from the worker, never the other way round.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from mosaic_core.config import budget_workspace_bytes
from mosaic_core.engine.keyframes import Keyframe
from mosaic_core.engine.results import Answer
from mosaic_core.errors import (
    AlreadyExistsError,
    BudgetError,
    CapacityError,
    ConfigError,
    MosaicError,
    UnknownStreamError,
)
from mosaic_core.model.pixels import validate_frames
from mosaic_core.model.video import probe_video
from services import gc_watch, gil_probe, heap_probe, stack_probe
from services.admission import check_admission
from services.config import ServiceConfig
from services.engine_loop import EngineLoop
from services.errors import DeadlineError
from services.ingest_queue import IngestQueues, PutOutcome, QueuedFrame
from services.metadata.base import MetadataStore, StreamRecord
from services.publisher import DeleteStream, MetadataPublisher, PutStream, WorkerView
from services.question_job import DONE, QuestionJob
from services.session import StreamSession
from services.sources import NETWORK_SCHEMES, SourcePolicy, SourceReader, SourceState
from services.store_actor import connect_store
from services.telemetry import DurabilityHealth, StreamTotals, TelemetryDelta, WorkerTelemetry, durability_health
from services.tier_sync import TierSync
from services.watches_spec import WatchReport, WatchSpec
from services.watches_worker import WorkerWatches

log = logging.getLogger(__name__)
MAX_RESTARTS = 3
# A stopping worker ingests the frames its sources queued for up to this long, within the time the router gives its
# shutdown (what is left of the pod's grace, services.router), before the checkpoint; frames left then are counted
# dropped (reason shutdown).
SHUTDOWN_INGEST_S = 2.0
SOURCES_STOP_S = 2.0  # at shutdown, the time the source readers get to stop, all together (they are daemons)
# An answer the engine loop has not ended this long past its question's deadline is given up by the answer thread
# waiting on it (the loop ends late answers itself, so only a stuck engine thread leaves one), and the thread goes back.
ABANDON_AFTER_DEADLINE_S = 30.0
# The worker's calls other than answers (``ask`` runs in ``ANSWER_GROUP``, ``answer_threads`` threads) and the
# router's polls (``TELEMETRY_GROUP``): frames, stream calls, cancels, the watch long-poll and the shutdown.
CONTROL_THREADS = 10
ANSWER_GROUP = "answers"
# The router's polls (``drain_telemetry``, ``keyframe_stats``, ``stream_ids``) run on threads of their own: the
# control threads' calls that wait for the engine thread (a second a call at 128 cameras) could hold all ten while
# the poll's 5 s ran out, and the router counted a busy worker down (``telemetry_call``).
TELEMETRY_GROUP = "telemetry"
TELEMETRY_THREADS = 2
# A cancel that comes before its ask (the ask waited for a thread) is kept this long, for the ask to find; at most
# EARLY_CANCELS_KEPT of them, the oldest going first.
EARLY_CANCEL_KEEP_S = 600.0
EARLY_CANCELS_KEPT = 4096
# How long a CreateStream waits for the engine thread to open its stream; an open that ends later is undone.
OPEN_STREAM_WAIT_S = 120.0


@dataclass(slots=True)
class StreamInfo:
    """One stream as its worker sees it (converted to ``mosaic.v1.Stream`` by the servicer)."""

    record: StreamRecord
    frames_received: int
    frames_ingested: int
    frames_dropped: int
    num_clusters: int
    clusters_by_tier: dict[str, int]
    bytes_by_tier: dict[str, int]
    first_timestamp_s: float | None
    last_timestamp_s: float | None
    lag_s: float
    queue_frames: int
    source_state: int
    source_error: str


@dataclass(slots=True)
class FrameRejection:
    """Why one pushed frame was refused; ``code`` is the gRPC status name it would fail a call with."""

    index: int
    stream_id: str
    reason: str
    code: str = "INVALID_ARGUMENT"


@dataclass(slots=True)
class PushResult:
    accepted: int = 0
    dropped: int = 0
    rejected: list[FrameRejection] = field(default_factory=list)


@dataclass(slots=True)
class WorkerInfo:
    worker_id: str
    device: str
    num_streams: int
    free_bytes: int
    restored_streams: list[str]
    rss_bytes: int
    pid: int = 0


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
        self.store = store if store is not None else connect_store(config.redis_url, namespace=config.redis_namespace)
        self.engine = engine if engine is not None else _build_engine(worker_id, config)
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
        self._lock = threading.Lock()
        self._cancel_lock = threading.Lock()  # a cancel and the submit of its ask, one at a time
        self._early_cancels: OrderedDict[str, float] = OrderedDict()  # question id -> when its cancel came
        self._health_seen = DurabilityHealth()
        self._keyframes_dropped_seen = 0  # EngineStats.keyframes_dropped at the previous keyframe_stats()
        self.loop = EngineLoop(
            self.engine,
            self.queues,
            self.tier_sync,
            self.telemetry,
            max_batch_frames=config.max_batch_frames,
            retention_s=self._retention_s,
            max_questions_per_stream=config.max_questions_per_stream,
            answer_slice_s=config.answer_slice_s,
            ingest_pause_layers=config.ingest_pause_layers,
            ingest_pause_frames=config.ingest_pause_frames,
            ingest_pause_blocks=config.ingest_pause_blocks,
            ingest_pause_placed=config.ingest_pause_placed,
            ingest_pause_lookahead=config.ingest_pause_lookahead,
            ingest_pause_skip_idle=config.ingest_pause_skip_idle,
            questions_alongside_ingest=config.questions_alongside_ingest,
            encode_ahead=config.encode_ahead and self.engine.parts.model.device.type == "cuda",
            after_ingest=self._after_ingest,
            max_background_jobs=config.watch_answer_queue_size,
            max_background_running=config.watch_answer_concurrency,
        )
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
        if config.freeze_heap_after_start:  # before any stream: a deleted stream's objects stay collectable
            gc_watch.freeze_once(f"worker {worker_id}")
        self.loop.start()
        stack_probe.start(
            f"worker-{worker_id}",
            self.loop.thread,
            since_chance=self.loop.questions.seconds_since_chance,
            chance_kind=self.loop.questions.last_chance_kind,
        )
        self.restored_streams = self._restore()
        self.publisher.start()

    # -- lifecycle ----------------------------------------------------------------------------------
    def info(self) -> WorkerInfo:
        """Readiness probe and placement input: free device + host bytes after every reservation."""
        stats = self.loop.call(self.engine.stats)  # fresh: the previous placement's reservation must show
        free = sum(max(0, stats.capacity_bytes_by_tier[t] - stats.used_bytes_by_tier[t]) for t in ("device", "host"))
        return WorkerInfo(
            self.worker_id,
            str(self.engine.model.device),
            len(self.sessions),
            free,
            self.restored_streams,
            _rss_bytes(),
            os.getpid(),
        )

    def shutdown(self) -> TelemetryDelta | None:
        """Stops sources, ingests what they queued (for up to ``SHUTDOWN_INGEST_S``; what is left is counted as
        dropped, reason ``shutdown``), makes every stream's history durable (open clusters and windows included), and
        lets the publisher finish before the store closes. Returns the telemetry since the last drain, those frames
        included, which no poll will take any more (None if it could not be read)."""
        sources = [session.source for session in list(self.sessions.values()) if session.source is not None]
        for source in sources:  # all at once: each notices within its decoder's poll, which one by one added up
            source.request_stop()
        stopped_by = time.monotonic() + SOURCES_STOP_S  # one wait for all: readers stuck in a lookup or a read
        for source in sources:
            source.stop(timeout_s=max(0.0, stopped_by - time.monotonic()))
        try:
            self.loop.call(self._end_ingest_and_checkpoint, time.monotonic() + SHUTDOWN_INGEST_S, timeout_s=60.0)
        except Exception as err:  # a shutdown still goes on; what was sealed before is on disk
            log.error("worker %s: checkpoint at shutdown failed: %s", self.worker_id, err)
        self.publisher.wait_idle(5.0)
        self.publisher.stop()
        self.loop.stop()
        try:
            last = self._telemetry_delta()  # counters are saved already, by the checkpoint's command
        except Exception as err:  # the engine must still close
            log.error("worker %s: its last telemetry could not be read: %s", self.worker_id, err)
            last = None
        self.engine.close()
        self.store.close()
        return last

    def _end_ingest_and_checkpoint(self, deadline_s: float) -> None:
        """Engine thread: no frame is ingested after the checkpoint, whose stream states would not hold it."""
        for stream_id, left in self.loop.ingest_calls.end_ingest(deadline_s).items():
            if stream_id in self.sessions:
                self.telemetry.dropped(stream_id, "shutdown", left)
        self._save_counters()
        try:
            self.engine.checkpoint()  # raises when some window's frames found no room: the others' are durable
        finally:
            self.tier_sync.flush(list(self.engine.streams))

    def _restore(self) -> list[str]:
        """Re-opens the streams of this worker's data directory, with their history and counters."""
        restored = []
        for stream in self.loop.call(self.engine.restore_streams, timeout_s=None):
            try:
                record = StreamRecord(**{**stream.meta, "worker_id": self.worker_id})
            except (TypeError, MosaicError) as err:  # a record this version no longer accepts
                log.error("worker %s keeps stream %s on disk but cannot serve it: %s", self.worker_id,
                          stream.stream_id, err)  # fmt: skip
                self.loop.call(self.engine.close_stream, stream.stream_id, forget_history=False)
                continue
            totals = StreamTotals(**(stream.state.get("counters") or {}))
            # Saved at each telemetry drain, while the engine's count comes from its journal: after a crash it may
            # be ahead, and a frame ingested was received.
            ingested = self.loop.call(self.engine.stream_stats, record.stream_id).frames_ingested
            totals.received, totals.ingested = max(totals.received, ingested), max(totals.ingested, ingested)
            self.telemetry.restore(record.stream_id, totals)
            self.loop.call(self.watches.restore_watermark, record.stream_id, stream.state.get("watch_watermark_s"))
            session = StreamSession(record, clock_epoch_unix=stream.state.get("clock_epoch_unix"))
            session.last_offered_s = stream.last_timestamp_s
            with self._lock:
                self.sessions[record.stream_id] = session
            self.queues.add_stream(record.stream_id, record.fps)
            if record.source_url and stream.state.get("source_ended"):
                session.source = SourceReader.never_started(
                    record.source_url, SourceState.ENDED, fps=record.fps, sink=_no_frames
                )
            elif record.source_url:
                try:
                    self._start_source(record, resume_after_s=stream.last_timestamp_s)
                except MosaicError as err:  # the file is gone, or the config no longer allows it: this stream only
                    reason = f"its source is no longer opened here: {err}"  # the check's sentence hides a password
                    log.error("worker %s restored stream %s without pulling it: %s", self.worker_id,
                              record.stream_id, reason)  # fmt: skip
                    session.source = SourceReader.never_started(
                        record.source_url, SourceState.ERROR, fps=record.fps, sink=_no_frames, error=reason
                    )
            restored.append(record.stream_id)
            log.info("worker %s restored stream %s with %d sealed clusters", self.worker_id, record.stream_id,
                     stream.num_clusters)  # fmt: skip
        return restored

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
        """Opens the stream in the engine and, for a source stream, starts pulling it."""
        with self._lock:
            if record.stream_id in self.sessions:
                raise AlreadyExistsError(f"stream {record.stream_id!r} is already open on worker {self.worker_id}")
            check_admission(
                self.loop.ingest_calls.capacity.frames_per_s(),
                offered_fps=sum(s.record.fps for s in self.sessions.values()),
                new_fps=record.fps,
                headroom=self.config.ingest_headroom,
                worker_id=self.worker_id,
                stream_id=record.stream_id,
            )
            self.sessions[record.stream_id] = StreamSession(record)
            self.telemetry.opened(record.stream_id)
        try:
            if record.source_url:
                SourcePolicy.of(self.config).check(record.source_url)
                if not record.source_url.lower().startswith(NETWORK_SCHEMES):
                    probe_video(record.source_url)  # an unreadable file under a source root fails at once
            meta = {k: v for k, v in dataclasses.asdict(record).items() if k != "worker_id"}
            try:
                self.loop.call(
                    self.engine.open_stream, record.stream_id, fps=record.fps, meta=meta, timeout_s=OPEN_STREAM_WAIT_S
                )
            except BudgetError as err:
                raise CapacityError(f"worker {self.worker_id} cannot take stream {record.stream_id!r}: {err}") from None
            except TimeoutError:
                # Posted before the session goes, so it runs ahead of the open of any retry, right after this open.
                self.loop.post(self._undo_late_open, record.stream_id)
                raise
            self.queues.add_stream(record.stream_id, record.fps)
        except BaseException:
            with self._lock:
                self.sessions.pop(record.stream_id, None)
            raise
        self.publisher.enqueue(PutStream(record))
        if record.source_url:
            self._start_source(record, resume_after_s=None)

    def _undo_late_open(self, stream_id: str) -> None:
        """Engine thread, after an open its CreateStream stopped waiting for: the caller was told it failed, so the
        stream it made (if it was made; a withdrawn open made none) goes, its history with it, lest it serve no one
        and come back at the next restart."""
        if stream_id not in self.engine.streams:
            return
        try:
            self.engine.close_stream(stream_id)
        except Exception as err:
            log.error("worker %s: stream %s, opened after its CreateStream gave up, could not be closed: %s",
                      self.worker_id, stream_id, err)  # fmt: skip
            return
        log.warning("worker %s: stream %s opened after its CreateStream gave up; closed again", self.worker_id,
                    stream_id)  # fmt: skip

    def _start_source(self, record: StreamRecord, *, resume_after_s: float | None) -> None:
        """Starts pulling. After a restart the stream clock goes on from where it was: past the last recorded
        frame, and, when the source's wall-clock start is known, at the wall-clock time that passed since."""
        session = self.sessions[record.stream_id]
        offset_s = 0.0
        if resume_after_s is not None:
            offset_s = resume_after_s + 1.0 / record.fps
            if session.clock_epoch_unix is not None:
                offset_s = max(offset_s, time.time() - session.clock_epoch_unix)

        def sink(timestamp_s: float, rgb: np.ndarray, sid: str = record.stream_id) -> None:
            self._offer(sid, timestamp_s + offset_s, rgb)

        cfg = self.config
        policy = SourcePolicy.of(cfg)
        # The path to open: symlinks and '..' resolved, checked against the roots.
        source = policy.check(record.source_url)
        reader = SourceReader(
            source,
            fps=record.fps,
            sink=sink,
            loop=record.loop_source,
            max_failures=cfg.source_max_failures,
            max_refused_frames=cfg.source_max_refused_frames,
            name=f"source-{record.stream_id}",
            decode_in_child=cfg.decode_sources_in_processes,
            max_pixels=cfg.decode_max_pixels(),
            blocked_networks=policy.blocked_networks,
        )
        session.source = reader.start()

    def close_stream(self, stream_id: str) -> int:
        """Ends the stream's questions, drops its queued frames, frees its KV and its durable history; returns
        the clusters freed.

        All or nothing. Everything is done in one engine-thread command, so no frame is ingested while it runs, and
        the stream's queued frames are dropped only once the engine has let go of the stream. When the engine cannot
        (its history could not be retired: a full volume, say), the error goes to the caller and the stream stays
        as it was, its source still pulling and its queued frames kept (only its questions were ended), so that a
        retried DeleteStream really deletes it: had the session gone first, the retry would have found no stream
        and reported it deleted while its history stayed, to come back at the next restart.
        """
        session = self.sessions.get(stream_id)
        if session is None:
            raise UnknownStreamError(f"stream {stream_id!r} is not open on worker {self.worker_id}")

        def close() -> int:
            if self.sessions.get(stream_id) is not session:  # a delete queued alongside this one went first
                raise UnknownStreamError(f"stream {stream_id!r} is not open on worker {self.worker_id}")
            self.loop.questions.cancel_stream_questions(
                stream_id
            )  # the engine refuses to close a stream a question reads
            num_clusters = len(self.engine.clusters(stream_id))
            self.engine.close_stream(stream_id)  # its durable history goes first, in one rename; if it fails, nothing
            with self._lock:
                del self.sessions[stream_id]  # from here frames of the stream are refused
            if session.source is not None:
                session.source.request_stop()
            dropped = self.loop.ingest_calls.drop_ahead(stream_id) + self.queues.remove_stream(stream_id)
            if dropped:
                self.telemetry.dropped(stream_id, "stream_deleted", dropped)
            self.tier_sync.forget_stream(stream_id)
            self.watches.forget_stream(stream_id)
            self.loop.last_ingested_s.pop(stream_id, None)
            self.publisher.enqueue(DeleteStream(stream_id))
            self.telemetry.forget(stream_id)
            return num_clusters

        try:
            num_clusters = self.loop.call(close)
        except UnknownStreamError:
            raise
        except TimeoutError:  # withdrawn unless it had started; if it had, a retry finds no stream, as it should
            log.error("worker %s: deleting stream %s did not finish in time", self.worker_id, stream_id)
            raise
        except Exception as err:
            log.error("worker %s: stream %s was not deleted and is kept as it was: %s", self.worker_id, stream_id, err)
            raise
        if session.source is not None:
            session.source.stop()  # asked to in the command: its frames are refused from then on
        return num_clusters

    def stream_ids(self) -> list[str]:
        return sorted(self.sessions)

    def stream_info(self, stream_id: str) -> StreamInfo:
        session = self.sessions.get(stream_id)
        if session is None:
            raise UnknownStreamError(f"stream {stream_id!r} is not open on worker {self.worker_id}")
        return self._info(session, self.loop.call(self.engine.stream_stats, stream_id))

    def keyframes(self, stream_id: str, keyframe_ids: list[str], cluster_id: str, latest: bool) -> list[Keyframe]:
        """A stream's keyframes by ids, by cluster or the newest (``Engine.keyframes``), read on the engine thread."""
        if stream_id not in self.sessions:
            raise UnknownStreamError(f"stream {stream_id!r} is not open on worker {self.worker_id}")
        return self.loop.call(
            self.engine.keyframes, stream_id, keyframe_ids=keyframe_ids, cluster_id=cluster_id, latest=latest
        )

    def stream_infos(self) -> list[StreamInfo]:
        """Every open stream's info from one engine-thread command: one command per stream waited behind an
        ingest pass each, and ListStreams ran out of time at 32 cameras under load."""
        sessions = {sid: s for sid, s in list(self.sessions.items())}
        stats = self.loop.call(self._all_stream_stats, list(sessions))
        return [self._info(sessions[sid], stats[sid]) for sid in sorted(sessions) if sid in stats]

    def _all_stream_stats(self, stream_ids: list[str]) -> dict:
        """Engine thread: the stats of each of ``stream_ids`` still open (a stream deleted meanwhile is left out)."""
        return {sid: self.engine.stream_stats(sid) for sid in stream_ids if sid in self.engine.streams}

    def _info(self, session: StreamSession, stats) -> StreamInfo:
        stream_id = session.stream_id
        totals = self.telemetry.totals(stream_id)
        progress = session.source.progress() if session.source is not None else None
        return StreamInfo(
            record=session.record,
            frames_received=totals.received,
            frames_ingested=stats.frames_ingested,
            frames_dropped=totals.dropped,
            num_clusters=stats.num_clusters,
            clusters_by_tier=dict(stats.clusters_by_tier),
            bytes_by_tier=dict(stats.bytes_by_tier),
            first_timestamp_s=stats.first_timestamp_s,
            last_timestamp_s=stats.last_timestamp_s,
            lag_s=self.loop.ingest_calls.oldest_wait_s(stream_id),
            queue_frames=self.queues.depth(stream_id),
            source_state=int(progress.state) if progress else int(SourceState.PUSH),
            source_error=progress.error if progress else "",
        )

    # -- ingest -------------------------------------------------------------------------------------
    def push(self, frames: list[tuple[int, str, float, np.ndarray]]) -> PushResult:
        """Queues decoded frames ``(index in the call, stream, timestamp_s, rgb)``; never raises per frame."""
        result = PushResult()
        for index, stream_id, timestamp_s, rgb in frames:
            try:
                outcome = self._offer(stream_id, timestamp_s, rgb, pushed=True)
            except MosaicError as err:
                result.rejected.append(FrameRejection(index, stream_id, str(err), err.grpc_code))
                if stream_id in self.sessions:
                    self.telemetry.dropped(stream_id, "invalid")
                continue
            result.accepted += 1
            result.dropped += outcome is PutOutcome.QUEUED_DROPPED_OLDEST
        return result

    def _offer(self, stream_id: str, timestamp_s: float, rgb: np.ndarray, *, pushed: bool = False) -> PutOutcome:
        session = self.sessions.get(stream_id)
        if session is None:
            raise UnknownStreamError(f"unknown stream {stream_id!r}")
        now = time.monotonic()
        if pushed:
            session.check_push(timestamp_s, now=now, max_skew_s=self.config.max_push_skew_s)
        rgb = validate_frames(rgb)[0]  # a bad frame is refused here, never reaching a shared batch
        outcome = self.queues.put(QueuedFrame(stream_id, timestamp_s, rgb, now))
        if outcome is PutOutcome.SAMPLED_OUT:
            return outcome
        session.last_offered_s = timestamp_s
        if session.anchor is None:
            session.anchor = (now, timestamp_s)
            if not pushed and session.clock_epoch_unix is None:
                session.clock_epoch_unix = time.time() - timestamp_s
                self.engine.save_stream_state(stream_id, clock_epoch_unix=session.clock_epoch_unix)
        self.telemetry.received(stream_id)
        if outcome is PutOutcome.QUEUED_DROPPED_OLDEST:
            self.telemetry.dropped(stream_id, "queue_full")
        return outcome

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

        ``timeout_s`` counts from ``sent_unix``, the caller's wall clock when it sent the ask, so the time the ask
        waited for one of the worker's answer threads counts against it (the router and its workers keep their clocks
        in step, as Kubernetes nodes do; a clock behind the caller's counts no wait).
        """
        arrived_s = time.monotonic()
        waited_s = 0.0 if sent_unix is None else min(timeout_s, max(0.0, time.time() - sent_unix))
        if sent_unix is not None:
            self.telemetry.answer_thread_wait(waited_s)
        session = self.sessions.get(stream_id)
        if session is None:
            raise UnknownStreamError(f"unknown stream {stream_id!r}")
        state = self.engine.streams.get(stream_id)
        session.check_answerable(0 if state is None else state.frames_ingested)
        job = QuestionJob(
            question_id=question_id or uuid.uuid4().hex,
            stream_id=stream_id,
            question=question,
            max_new_tokens=max_new_tokens,
            time_range=None if time_range is None else (float(time_range[0]), float(time_range[1])),
            deadline_s=arrived_s + timeout_s - waited_s,
            retention_s=session.record.retention_s,
        )
        with self._cancel_lock:
            self.loop.questions.submit(job)
            if self._early_cancels.pop(job.question_id, None) is not None:
                self.loop.questions.cancel(job.question_id)
        first_out_s = None
        try:
            while (item := self._next_event(job)) is not DONE:
                if isinstance(item, BaseException):
                    raise item
                if first_out_s is None:
                    first_out_s = time.monotonic()
                if isinstance(item, Answer):
                    item.timings.worker_first_token_s = first_out_s - arrived_s
                    item.timings.token_handoff_s = max(0.0, first_out_s - (job.first_event_s or first_out_s))
                yield item
        finally:
            job.cancelled.set()

    @staticmethod
    def _next_event(job: QuestionJob):
        """The answer's next event, or DeadlineError once ``ABANDON_AFTER_DEADLINE_S`` past its deadline."""
        try:
            return job.events.get(timeout=max(0.0, job.deadline_s + ABANDON_AFTER_DEADLINE_S - time.monotonic()))
        except queue.Empty:
            raise DeadlineError(
                f"question {job.question_id}: the worker's engine thread did not end its answer within "
                f"{ABANDON_AFTER_DEADLINE_S:g} s of its deadline; it is given up"
            ) from None

    def questions_of(self, stream_id: str) -> int:
        """The stream's questions running or waiting on this worker; past ``max_questions_per_stream`` the next is
        refused RESOURCE_EXHAUSTED."""
        return self.loop.questions.questions_of(stream_id)

    def cancel(self, question_id: str) -> bool:
        """Stops a question's answer; True when it was here. A cancel that comes before its ask (which waits for an
        answer thread, and may come after the cancel) is kept for ``EARLY_CANCEL_KEEP_S``: the ask, when it comes,
        is stopped at once."""
        with self._cancel_lock:
            if self.loop.questions.cancel(question_id):
                return True
            now = time.monotonic()
            kept = self._early_cancels
            while kept and (len(kept) >= EARLY_CANCELS_KEPT or now - next(iter(kept.values())) > EARLY_CANCEL_KEEP_S):
                kept.popitem(last=False)
            self._early_cancels[question_id] = now
            return False

    # -- standing questions -------------------------------------------------------------------------
    def set_watches(self, specs: list[WatchSpec]) -> int:
        """Replaces the watches this worker evaluates (the router sends them all); returns how many."""
        self.watches.set_watches(specs)
        return len(specs)

    def take_watch_events(self, wait_s: float) -> WatchReport:
        """Events fired since the last call, waiting up to ``wait_s`` for one (the router long-polls)."""
        return self.watches.take(wait_s)

    def _after_ingest(self, stream_ids) -> None:
        self.watches.on_ingested(stream_ids)

    # -- telemetry ----------------------------------------------------------------------------------
    def drain_telemetry(self) -> TelemetryDelta:
        delta = self._telemetry_delta()
        self._save_counters()
        return delta

    def _telemetry_delta(self) -> TelemetryDelta:
        lags = {sid: self.loop.ingest_calls.oldest_wait_s(sid) for sid in list(self.sessions)}
        delta = self.telemetry.drain(queue_depths=self.queues.depths(), lags_s=lags, engine_stats=self.loop.stats)
        delta.durability = self._durability_delta()
        delta.engine_stalled_s = self.loop.questions.seconds_since_chance()
        sources = [session.source for session in list(self.sessions.values()) if session.source is not None]
        delta.sources_failing = sum(source.progress().state is SourceState.ERROR for source in sources)
        return delta

    def keyframe_stats(self) -> tuple[int, int]:
        """``(keyframe bytes held, keyframes dropped since the previous call)`` from the engine's latest stats."""
        stats = self.loop.stats
        if stats is None:
            return 0, 0
        dropped, self._keyframes_dropped_seen = (
            stats.keyframes_dropped - self._keyframes_dropped_seen,
            stats.keyframes_dropped,
        )
        return stats.keyframe_bytes, max(0, dropped)

    def _durability_delta(self) -> DurabilityHealth:
        history = self.engine.history
        durable = None if history is None else history.store.snapshot_stats()
        now = durability_health(
            os.getpid(), self.publisher.snapshot_stats(), durable, history, self.engine.config.history_budget_bytes
        )
        seen, self._health_seen = self._health_seen, now
        return now.increments_since(seen)

    def _save_counters(self) -> None:
        for stream_id in list(self.sessions):
            totals = self.telemetry.totals(stream_id)
            fields = {"counters": dataclasses.asdict(totals)}
            session = self.sessions.get(stream_id)
            if session is not None and session.source is not None:  # a restart must not read an ended clip again
                fields["source_ended"] = session.source.progress().state is SourceState.ENDED
            watermark_s = self.watches.watermark_of(stream_id)
            if watermark_s is not None:
                fields["watch_watermark_s"] = watermark_s
            self.engine.save_stream_state(stream_id, **fields)

    def _clock_epoch_unix(self, stream_id: str) -> float:
        """Unix time at which the stream's clock read 0: a pulled source's clock starts at 0, a pushed one is Unix."""
        session = self.sessions.get(stream_id)
        return 0.0 if session is None or session.clock_epoch_unix is None else session.clock_epoch_unix

    def _retention_s(self, stream_id: str) -> float:
        session = self.sessions.get(stream_id)
        return 0.0 if session is None else session.record.retention_s


def _no_frames(timestamp_s: float, rgb: np.ndarray) -> None:
    """The sink of a source that never runs (``SourceReader.never_started``)."""


def _rss_bytes() -> int:
    """Resident memory of this process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _build_engine(worker_id: str, config: ServiceConfig):
    import torch

    from mosaic_core.engine.engine import Engine

    device = "cuda" if config.worker_gpus > 0 and torch.cuda.is_available() else "cpu"
    # Presets default to float32, which on a GPU doubles the weights' memory and leaves the tensor cores idle.
    dtype = torch.bfloat16 if device == "cuda" else None
    engine_config = config.engine_config(worker_subdir=f"worker-{worker_id}")
    engine = Engine.from_model(
        config.model,
        engine_config,
        device=device,
        dtype=dtype,
        device_budget_share=config.device_budget_share,
        vision_attention=config.vision_attention,
    )
    if engine.config.device_budget_bytes != engine_config.device_budget_bytes:
        log.info(
            "device budget %.1f GiB: %.0f%% of the GPU memory free once the model was loaded, less %.1f GiB",
            engine.config.device_budget_bytes / 2**30,
            100 * config.device_budget_share,
            budget_workspace_bytes(tower_stream=engine.config.tower_stream) / 2**30,
        )
    if device == "cuda":  # capture the question graphs now, not while the first users wait (CPU runs no graphs)
        started = time.monotonic()
        warm = engine.warm_up(max_new_tokens=config.default_max_new_tokens)
        log.info(
            "worker %s: warmed up in %.1f s (%s Triton kernel variants compiled) with %d questions %s, answers "
            "decoded together in batches of up to %d, and %s",
            worker_id,
            time.monotonic() - started,
            engine.stats().kernel_compiles,
            warm.questions,
            "over a scratch history" if warm.with_history else "with no history to retrieve",
            max(warm.decode_batches, default=1),
            "an ingest pass" if warm.ingested else "no ingest pass (the device budget cannot hold its scratch windows)",
        )
    return engine


def send_ask(worker, question_id, stream_id, question, max_new_tokens, time_range, timeout_s: float):
    """Asks a worker actor for one stream's answer as the router does: on its answer threads, with the wall clock
    the ask was sent at (``WorkerCore.ask``). Returns the Ray streaming generator of the answer's events."""
    return worker.ask.options(concurrency_group=ANSWER_GROUP).remote(
        question_id, stream_id, question, max_new_tokens, time_range, timeout_s, time.time()
    )


def telemetry_call(method):
    """A worker actor's poll method (``drain_telemetry``, ``keyframe_stats``, ``stream_ids``) on its telemetry
    threads, ready for ``.remote()``."""
    return method.options(concurrency_group=TELEMETRY_GROUP)


def worker_concurrency_groups(config: ServiceConfig) -> dict[str, int]:
    """The worker actor's thread groups beside its ``CONTROL_THREADS``: answers, and the router's polls."""
    return {ANSWER_GROUP: config.answer_threads, TELEMETRY_GROUP: TELEMETRY_THREADS}


def worker_actor(config: ServiceConfig):
    """The Ray actor class of a worker, with its resources, restarts and thread count."""
    import ray

    return ray.remote(concurrency_groups=worker_concurrency_groups(config))(WorkerCore).options(
        num_cpus=config.worker_cpus,
        num_gpus=config.worker_gpus,
        max_restarts=MAX_RESTARTS,
        max_task_retries=0,
        max_concurrency=CONTROL_THREADS,
    )
