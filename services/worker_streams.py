"""The streams of one worker: opened, closed, restored from its data directory, each with its source reader, and
described (``StreamInfo``, keyframes).

Engine work runs on the engine thread (``EngineLoop.call``); the sessions are the worker's, changed here under its
lock.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from mosaic_core.durable.progress import RestoreProgress
from mosaic_core.engine.history import RestoredStream
from mosaic_core.engine.keyframes import Keyframe
from mosaic_core.errors import AlreadyExistsError, BudgetError, CapacityError, MosaicError, UnknownStreamError
from mosaic_core.model.video import probe_video
from services.admission import check_admission
from services.config import ServiceConfig
from services.engine_loop import EngineLoop
from services.ingest_queue import IngestQueues
from services.metadata.base import StreamRecord
from services.publisher import DeleteStream, MetadataPublisher, PutStream
from services.session import StreamSession
from services.source_policy import SourcePolicy
from services.source_resume import FILE_OFFSETS, FileResume, file_resume, read_to_its_end, stream_time_s
from services.sources import NETWORK_SCHEMES, SourceReader, SourceState
from services.telemetry import StreamTotals, WorkerTelemetry
from services.tier_sync import TierSync
from services.watches_worker import WorkerWatches
from services.worker_results import StreamInfo

log = logging.getLogger(__name__)
# How long a CreateStream waits for the engine thread to open its stream; an open that ends later is undone.
OPEN_STREAM_WAIT_S = 120.0


class WorkerStreams:
    """Opens, closes, restores and describes one worker's streams.

    Args:
        worker_id: the worker's index, for messages.
        config: service settings (admission headroom, source policy and reader settings).
        engine: the worker's engine.
        loop: the engine loop whose thread runs every engine call.
        queues: per-stream ingest queues.
        telemetry: per-stream counters.
        publisher: tells the metadata store about streams opened and deleted.
        tier_sync: forgets a deleted stream's clusters.
        watches: restores and forgets a stream's watch watermark.
        sessions: the worker's open streams by id, changed only here, under this object's lock.
        offer: queues one frame of a pulled source (``FrameIntake.offer``): ``offer(stream_id, timestamp_s, rgb)``.
    """

    def __init__(
        self,
        worker_id: str,
        config: ServiceConfig,
        engine,
        loop: EngineLoop,
        queues: IngestQueues,
        telemetry: WorkerTelemetry,
        publisher: MetadataPublisher,
        tier_sync: TierSync,
        watches: WorkerWatches,
        sessions: dict[str, StreamSession],
        offer: Callable[[str, float, np.ndarray], object],
    ) -> None:
        self.worker_id = worker_id
        self.config = config
        self.engine = engine
        self.loop = loop
        self.queues = queues
        self.telemetry = telemetry
        self.publisher = publisher
        self.tier_sync = tier_sync
        self.watches = watches
        self.sessions = sessions
        self._lock = threading.Lock()
        self._offer = offer

    def restore(self, on_progress: Callable[[RestoreProgress], None] | None = None) -> list[str]:
        """Re-opens the streams of this worker's data directory, with their history and counters; logs what it
        serves, and how long the restore took, at the end. ``on_progress`` watches the engine's restore of each
        stream (``Engine.restore_streams``), on the engine thread."""
        started_s = time.monotonic()
        restored, refused, not_pulled = [], 0, 0
        for stream in self.loop.call(self.engine.restore_streams, on_progress, timeout_s=None):
            try:
                record = StreamRecord(**{**stream.meta, "worker_id": self.worker_id})
            except (TypeError, MosaicError) as err:  # a record this version no longer accepts
                log.error("worker %s keeps stream %s on disk but cannot serve it: %s", self.worker_id,
                          stream.stream_id, err)  # fmt: skip
                self.loop.call(self.engine.close_stream, stream.stream_id, forget_history=False)
                self.engine.history.store.leave(stream.stream_id, "record_refused")  # counted: its folder holds its id
                refused += 1
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
            if record.source_url and stream.state.get("source_ended") and self._ended_whole(record, stream):
                session.source = SourceReader.never_started(
                    record.source_url, SourceState.ENDED, fps=record.fps, sink=_no_frames
                )
            elif record.source_url:
                try:
                    self._start_source(record, resume_after_s=stream.last_timestamp_s, restored=stream)
                except MosaicError as err:  # the file is gone, or the config no longer allows it: this stream only
                    reason = f"its source is no longer opened here: {err}"  # the check's sentence hides a password
                    log.error("worker %s restored stream %s without pulling it: %s", self.worker_id,
                              record.stream_id, reason)  # fmt: skip
                    session.source = SourceReader.never_started(
                        record.source_url, SourceState.ERROR, fps=record.fps, sink=_no_frames, error=reason
                    )
                    not_pulled += 1
            restored.append(record.stream_id)
            log.info("worker %s restored stream %s with %d sealed clusters", self.worker_id, record.stream_id,
                     stream.num_clusters)  # fmt: skip
        log.info("worker %s restored %d %s in %.1f s and serves them, %d of them not pulled (their sources are no "
                 "longer opened here); streams kept on disk, unserved, as this release refuses their stored records: "
                 "%d", self.worker_id, len(restored), "stream" if len(restored) == 1 else "streams",
                 time.monotonic() - started_s, not_pulled, refused)  # fmt: skip
        return restored

    @staticmethod
    def _ended_whole(record: StreamRecord, stream: RestoredStream) -> bool:
        """Whether an ended source stays ended: a network source does; a file whose last frames are not in its sealed
        clusters (dropped at a graceful stop, still queued after its 2 s of ingest, or lost with a crash after its end
        was saved) goes on reading them (``_file_resume``)."""
        if record.source_url.lower().startswith(NETWORK_SCHEMES):
            return True
        return read_to_its_end(stream.state, stream.last_sealed_s)

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

    def _start_source(
        self, record: StreamRecord, *, resume_after_s: float | None, restored: RestoredStream | None = None
    ) -> None:
        """Starts pulling. After a restart the stream clock goes on from where it was: past the last recorded
        frame, and, when the source's wall-clock start is known, at the wall-clock time that passed since. The
        latter holds when no frame was recorded too (the worker died before the first ingest): started at 0 again,
        the clock would disagree with the restored start that evidence times and watches read, and stamp new video
        with times the stream had already used. A restarted local file goes on from its position, its frames the
        stream had given out before at the times they had (``_file_resume``); a network source, http(s) included (it
        may be a live camera's MJPEG or MPEG-TS), from where it is now."""
        session = self.sessions[record.stream_id]
        cfg = self.config
        policy = SourcePolicy.of(cfg)
        # The path to open: symlinks and '..' resolved, checked against the roots, before a restored stream's clock
        # or history changes for it.
        source = policy.check(record.source_url)
        offset_s = 0.0 if resume_after_s is None else resume_after_s + 1.0 / record.fps
        if session.clock_epoch_unix is not None:
            offset_s = max(offset_s, time.time() - session.clock_epoch_unix)
        position_s, stamps = None, ((None, offset_s),)
        if restored is not None and not record.source_url.lower().startswith(NETWORK_SCHEMES):
            resume = self._file_resume(session, restored, offset_s)
            position_s, stamps = resume.position_s, resume.stamps

        def sink(timestamp_s: float, rgb: np.ndarray, sid: str = record.stream_id) -> None:
            self._offer(sid, stream_time_s(stamps, timestamp_s), rgb)

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
            resume_after_s=position_s,
        )
        session.source = reader.start()

    def _file_resume(self, session: StreamSession, restored: RestoredStream, clock_offset_s: float) -> FileResume:
        """Where a restarted file goes on, and the stream times of its frames (``services.source_resume``).

        It resumes after the file time of the newest frame of its sealed clusters: the history a crash leaves. The
        frames after it that were queued, or ingested into the window or the open cluster, did not outlive the worker,
        so they are read again: those the stream had given out at the times they had, for which the engine's stream
        first goes back to that newest sealed frame (answers, watch events and keyframes may have cited them), and
        the frames after those on the clock as it goes on now, at the wall clock's time since the clock started. The
        segments are written to the stream's state before the reader starts, so that a later restart finds the file
        time of any frame this one stamps. With no sealed cluster, or segments that are not readable, the file is
        read from its start at ``clock_offset_s``, after every time given out.
        """
        resume = file_resume(
            restored.state,
            last_sealed_s=restored.last_sealed_s,
            last_timestamp_s=restored.last_timestamp_s,
            clock_s=None if session.clock_epoch_unix is None else time.time() - session.clock_epoch_unix,
            fallback_offset_s=clock_offset_s,
        )
        if resume.rewinds:
            self.loop.call(self.engine.rewind_to_sealed, session.stream_id)
        try:
            self.engine.write_stream_state(session.stream_id, **{FILE_OFFSETS: resume.segments})
        except OSError as err:
            log.error("stream %s: where its file's clock goes on is not on disk yet (%s); a restart before the next "
                      "saved state may resume the file at another position", session.stream_id, err)  # fmt: skip
        return resume

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
            # the engine refuses to close a stream a question reads
            self.loop.questions.cancel_stream_questions(stream_id)
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


def _no_frames(timestamp_s: float, rgb: np.ndarray) -> None:
    """The sink of a source that never runs (``SourceReader.never_started``)."""
