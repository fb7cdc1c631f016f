"""A worker's counters (``WorkerCounters``): the telemetry the router drains, with the durable history's health since
the last drain, the keyframes dropped since the last ask, and each stream's totals saved in its state so that a
restart goes on counting from them."""

from __future__ import annotations

import dataclasses
import os

from services.engine_loop import EngineLoop
from services.ingest_queue import IngestQueues
from services.publisher import MetadataPublisher
from services.session import StreamSession
from services.source_resume import SOURCE_LAST_OFFERED
from services.sources import SourceState
from services.telemetry import DurabilityHealth, TelemetryDelta, WorkerTelemetry, durability_health
from services.watches_worker import WorkerWatches


class WorkerCounters:
    """What one worker counted since it was last asked.

    Args:
        engine: the worker's engine (its history's writer, its streams' saved state).
        loop: the worker's engine loop (its latest engine stats, each stream's oldest queued frame).
        queues: the worker's ingest queues (their depths).
        telemetry: the worker's per-stream counters.
        publisher: the worker's metadata publisher (its queue's health).
        watches: the worker's watches (each stream's watermark, saved with its totals).
        sessions: the worker's open streams, shared with the worker.
    """

    def __init__(
        self,
        engine,
        loop: EngineLoop,
        queues: IngestQueues,
        telemetry: WorkerTelemetry,
        publisher: MetadataPublisher,
        watches: WorkerWatches,
        sessions: dict[str, StreamSession],
    ) -> None:
        self.engine = engine
        self.loop = loop
        self.queues = queues
        self.telemetry = telemetry
        self.publisher = publisher
        self.watches = watches
        self.sessions = sessions
        self._health_seen = DurabilityHealth()
        self._keyframes_dropped_seen = 0  # EngineStats.keyframes_dropped at the previous keyframe_stats()

    def delta(self, *, restore_s: float, streams_restored: int) -> TelemetryDelta:
        """The telemetry since the previous delta, with the start's restore (its time, the streams it restored)."""
        lags = {sid: self.loop.ingest_calls.oldest_wait_s(sid) for sid in list(self.sessions)}
        delta = self.telemetry.drain(queue_depths=self.queues.depths(), lags_s=lags, engine_stats=self.loop.stats)
        delta.durability = self._durability_delta(restore_s, streams_restored)
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

    def save(self) -> None:
        """Each stream's totals (and whether its source ended, and its watches' watermark) in its saved state."""
        for stream_id in list(self.sessions):
            totals = self.telemetry.totals(stream_id)
            fields = {"counters": dataclasses.asdict(totals)}
            session = self.sessions.get(stream_id)
            if session is not None and session.source is not None:  # a restart must not read an ended clip again
                fields["source_ended"] = session.source.progress().state is SourceState.ENDED
                # unless its last frames are in no sealed cluster (dropped at a stop, lost in a crash): a file reads
                # them again (``WorkerStreams._ended_whole``)
                fields[SOURCE_LAST_OFFERED] = session.last_offered_s
            watermark_s = self.watches.watermark_of(stream_id)
            if watermark_s is not None:
                fields["watch_watermark_s"] = watermark_s
            self.engine.save_stream_state(stream_id, **fields)

    def _durability_delta(self, restore_s: float, streams_restored: int) -> DurabilityHealth:
        history = self.engine.history
        durable = None if history is None else history.store.snapshot_stats()
        now = durability_health(
            os.getpid(),
            self.publisher.snapshot_stats(),
            durable,
            history,
            self.engine.config.history_budget_bytes,
            restore_s=restore_s,
            streams_restored=streams_restored,
        )
        seen, self._health_seen = self._health_seen, now
        return now.increments_since(seen)
