"""The router's view of the cluster: worker actors, stream placement, and routing of frames and questions.

Works on core dataclasses only (``StreamRecord``, ``StreamInfo``, ``PushResult``, engine events); the
servicer converts to and from protobuf.

**Placement by free budget.** A new stream goes to the live worker with the most free device + host KV
bytes (after the sink + window reservations of the streams it already has); ties go to the worker with
fewer streams; a worker that cannot hold it after all (RESOURCE_EXHAUSTED) passes it to the next. Creations
of different streams run side by side: each worker checks its own room under its own lock, so two creates that
rank the same worker first cannot overfill it (the second is refused there and tries the next).

**The workers are the truth.** Placement is read from the workers themselves at start-up (each restores its
streams from its data directory), never from the metadata store, which the workers publish to behind their
engines. Until the workers answer, calls about streams get UNAVAILABLE with a retry hint, not NOT_FOUND. A worker
that comes back (it answers a telemetry poll after missing one, or from another process) is asked again which
streams it holds, and ListStreams takes what every worker lists: one restarted by Ray restores streams whose
CreateStream reply its crash lost. A stream whose delete ended after the listing was asked for is not taken back.

**A worker that stops answering** loses its own gauges (``MosaicMetrics.forget_worker``): they would read as its
last healthy values. Its streams' lag goes on growing from the last value it reported, since they ingest nothing,
and their queue depth reads 0, as its queues went with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator

import ray

from mosaic_core.engine.keyframes import Keyframe
from mosaic_core.engine.results import Answer
from mosaic_core.engine.stream import check_stream_id
from mosaic_core.errors import AlreadyExistsError, CapacityError, MosaicError, UnknownStreamError
from services.errors import UnavailableError, unwrap
from services.metadata.base import MetadataStore, StreamRecord
from services.metrics import MosaicMetrics
from services.telemetry import TelemetryDelta, apply_delta
from services.worker_actor import send_ask, telemetry_call
from services.worker_results import FrameRejection, PushResult, StreamInfo, WorkerInfo

log = logging.getLogger(__name__)
DELETES_KEPT_S = 60.0  # how long a delete's end is remembered against listings asked before it
# An engine thread with no chance to start a question for this long is stuck: an ingest call takes about a second,
# a first compile or graph capture tens of seconds.
ENGINE_STALL_S = 300.0


class Coordinator:
    """Streams, workers and routing for one router process.

    Args:
        workers: Ray actor handles of ``WorkerCore``, index = worker id.
        store: metadata store shared with the workers.
        metrics: the router's metrics.
    """

    def __init__(self, workers: list, store: MetadataStore | None, metrics: MosaicMetrics) -> None:
        self.workers = workers
        self.store = store
        self.metrics = metrics
        self.placement: dict[str, int] = {}  # stream -> worker index
        self._creating: set[str] = set()  # streams whose CreateStream is under way
        self._deleting: set[str] = set()  # and whose DeleteStream is
        self._deleted_s: dict[str, float] = {}  # stream -> when its last delete ended (monotonic), for a minute
        self._alive: set[int] = set()
        self._stalled: set[int] = set()  # workers that answer, but whose engine thread is stuck (``ENGINE_STALL_S``)
        self._pids: dict[int, int] = {}  # worker index -> its process, as its last answer gave it
        self._down_since: dict[int, float] = {}  # worker index -> when it first missed a poll (monotonic)
        self._last_lags: dict[str, float] = {}  # stream -> the lag its worker last reported
        self._to_list: set[int] = set()  # workers back whose streams could not be listed yet
        self._pending: dict[tuple[str, int], asyncio.Future] = {}  # (call, worker) -> an answer a poll waits for
        self.started = False

    async def start(self, timeout_s: float) -> list[WorkerInfo]:
        """Waits for every worker to build its engine and restore its streams; takes placement from them. Until it
        returns or raises, ``mosaic_workers_starting`` counts the workers; then they are up, or the router gives up."""
        self.metrics.set_workers_starting(len(self.workers))
        try:
            infos = await asyncio.wait_for(asyncio.gather(*(w.info.remote() for w in self.workers)), timeout_s)
            owned = await asyncio.gather(*(telemetry_call(w.stream_ids).remote() for w in self.workers))
        except BaseException:
            self.metrics.set_workers_starting(0)  # the router gives up on them and stops
            raise
        self._alive = set(range(len(self.workers)))
        self._pids = {index: info.pid for index, info in enumerate(infos)}
        self.placement = {stream_id: index for index, ids in enumerate(owned) for stream_id in ids}
        self.started = True
        self.metrics.set_workers_up(len(self._alive))
        self.metrics.set_workers_starting(0)  # after the line above: no scrape in between reads them gone
        self.metrics.set_active_streams(len(self.placement))
        return infos

    @property
    def alive_workers(self) -> frozenset[int]:
        """Workers that answered the last telemetry poll."""
        return frozenset(self._alive)

    @property
    def ready_workers(self) -> frozenset[int]:
        """Workers that answered the last telemetry poll with an engine thread that is not stuck: those that can
        take questions and new streams (readiness)."""
        return frozenset(self._alive - self._stalled)

    def _index_of(self, stream_id: str) -> int:
        index = self.placement.get(stream_id)
        if index is None:
            if not self.started:
                raise UnavailableError(
                    "the server is starting and its workers are restoring their streams; retry in a few seconds"
                )
            raise UnknownStreamError(f"unknown stream {stream_id!r}; create it first or check ListStreams")
        return index

    def worker_of(self, stream_id: str):
        return self.workers[self._index_of(stream_id)]

    # -- streams ------------------------------------------------------------------------------------
    async def create_stream(self, record: StreamRecord) -> StreamInfo:
        check_stream_id(record.stream_id)
        if not self.started:
            raise UnavailableError("the server is starting; retry CreateStream in a few seconds")
        # Creates of different streams run side by side: each waits for its worker's engine thread to finish the
        # ingest call under way (about a second at 128 cameras on the H200), so one at a time 160 creates took over
        # 100 s there. A worker checks its own room (admission, budget) under its own lock, so two creates cannot
        # overfill it.
        if record.stream_id in self.placement or record.stream_id in self._creating:
            raise AlreadyExistsError(f"stream {record.stream_id!r} already exists")
        self._creating.add(record.stream_id)
        try:
            self.placement[record.stream_id] = await self._open_on_a_worker(record)
        finally:
            self._creating.discard(record.stream_id)
        self.metrics.set_active_streams(len(self.placement))
        return await self.get_stream(record.stream_id)

    async def _open_on_a_worker(self, record: StreamRecord) -> int:
        """Opens the stream on the worker with the most room that takes it; returns its index."""
        refusals, kept_history = [], []
        ranked = await self._rank_workers()
        for index, info in ranked:  # a worker restarted since the lost answer of an earlier create holds it
            if record.stream_id in info.restored_streams:
                await self._adopt_restored(record.stream_id, index)
        for index, _ in ranked:
            record.worker_id = str(index)
            try:
                await self._call(index, self.workers[index].open_stream.remote(record))
            except CapacityError as err:
                refusals.append(str(err))
                continue
            except AlreadyExistsError as err:
                await self._adopt_restored(record.stream_id, index)
                kept_history.append(f"worker {index}: {err}")  # history of that id it keeps but cannot serve
                continue
            return index
        if kept_history and not refusals:
            raise AlreadyExistsError(f"stream {record.stream_id!r} cannot be created: " + "; ".join(kept_history))
        raise CapacityError(
            f"no worker has room for stream {record.stream_id!r}: "
            + "; ".join(refusals + kept_history)
            + ". Delete streams, shorten retention or add workers"
        )

    async def delete_stream(self, stream_id: str) -> int:
        """All or nothing: the worker forgets the stream (its history in one rename) or the call fails and
        the stream stays. The worker's publisher then removes it from the metadata store, retrying through
        an outage."""
        index = self._index_of(stream_id)
        self._deleting.add(stream_id)
        try:
            num_clusters = await self._call(index, self.workers[index].close_stream.remote(stream_id))
        except UnknownStreamError:
            num_clusters = 0  # the worker no longer has it
        finally:
            self._deleting.discard(stream_id)
        now = time.monotonic()
        self._deleted_s = {s: t for s, t in self._deleted_s.items() if now - t < DELETES_KEPT_S}
        self._deleted_s[stream_id] = now
        self.placement.pop(stream_id, None)
        self._last_lags.pop(stream_id, None)
        self.metrics.streams.forget_stream(stream_id)
        self.metrics.set_active_streams(len(self.placement))
        return num_clusters

    async def get_stream(self, stream_id: str) -> StreamInfo:
        index = self._index_of(stream_id)
        info = await self._call(index, self.workers[index].stream_info.remote(stream_id))
        info.record.worker_id = str(index)
        return info

    async def get_keyframes(
        self, stream_id: str, *, keyframe_ids: list[str], cluster_id: str, latest: bool
    ) -> list[Keyframe]:
        index = self._index_of(stream_id)
        worker = self.workers[index]
        return await self._call(index, worker.keyframes.remote(stream_id, keyframe_ids, cluster_id, latest))

    async def list_streams(self) -> list[StreamInfo]:
        """Every stream of every worker; UNAVAILABLE, naming the workers, if any cannot answer (a partial list
        would read as streams that no longer exist)."""
        if not self.started:
            raise UnavailableError("the server is starting and its workers are restoring their streams; retry")
        indices, asked_s = range(len(self.workers)), time.monotonic()
        results = await asyncio.gather(
            *(asyncio.wait_for(self._call(i, self.workers[i].stream_infos.remote()), 10.0) for i in indices),
            return_exceptions=True,
        )
        down = [str(i) for i, result in zip(indices, results, strict=True) if isinstance(result, BaseException)]
        if down:
            owned = sum(1 for index in self.placement.values() if str(index) in down)
            raise UnavailableError(
                f"worker {', '.join(down)} is not answering (restarting?); its {owned} streams cannot be listed. "
                "Retry shortly"
            )
        infos: list[StreamInfo] = []
        for index, result in zip(indices, results, strict=True):
            for info in result:
                info.record.worker_id = str(index)
                infos.append(info)
            self._adopt(index, {info.record.stream_id for info in result}, asked_s)
        return sorted(infos, key=lambda i: i.record.stream_id)

    def _adopt(self, index: int, held: set[str], asked_s: float) -> list[str]:
        """Places on worker ``index`` the streams of ``held`` (what it listed, asked at ``asked_s``) that the router
        does not know, unless one is being created or deleted, or its delete ended after the listing was asked."""
        adopted = []
        for stream_id in sorted(held - set(self.placement) - self._creating - self._deleting):
            if self._deleted_s.get(stream_id, float("-inf")) >= asked_s:
                continue
            log.info("worker %d holds stream %r, which the router did not know: it restored it", index, stream_id)
            self.placement[stream_id] = index
            adopted.append(stream_id)
        if adopted:
            self.metrics.set_active_streams(len(self.placement))
        return adopted

    async def _adopt_restored(self, stream_id: str, index: int) -> None:
        """Worker ``index`` restored ``stream_id`` or refused to create it as existing: if it holds it, an earlier
        CreateStream made it there (the stream is durable before the worker answers) and its answer was lost to a
        crash, so the router places it there and the create is refused as ALREADY_EXISTS."""
        if stream_id not in await self._call(index, telemetry_call(self.workers[index].stream_ids).remote()):
            return
        self.placement[stream_id] = index
        self.metrics.set_active_streams(len(self.placement))
        raise AlreadyExistsError(
            f"stream {stream_id!r} already exists on worker {index} (an earlier CreateStream made it, though its "
            "answer may not have reached you)"
        )

    async def _rank_workers(self) -> list[tuple[int, WorkerInfo]]:
        """Live workers and what they said of themselves, most free budget first."""
        live = sorted(self._alive - self._stalled)
        results = await asyncio.gather(*(self.workers[i].info.remote() for i in live), return_exceptions=True)
        ranked = [
            (-info.free_bytes, info.num_streams, index, info)
            for index, info in zip(live, results, strict=True)
            if not isinstance(info, BaseException)
        ]
        if not ranked:
            raise UnavailableError("no worker is up to take the stream; retry shortly")
        return [(index, info) for *_, index, info in sorted(ranked, key=lambda r: r[:3])]

    # -- ingest -------------------------------------------------------------------------------------
    async def push(self, frames: list[tuple[int, str, float, object]]) -> PushResult:
        """Routes decoded frames ``(index, stream, timestamp_s, rgb)`` to their workers."""
        result = PushResult()
        by_worker: dict[int, list] = defaultdict(list)
        for item in frames:
            index = self.placement.get(item[1])
            if index is None:
                if not self.started:
                    raise UnavailableError("the server is starting; retry PushFrames in a few seconds")
                reason = f"unknown stream {item[1]!r}"
                result.rejected.append(FrameRejection(item[0], item[1], reason, UnknownStreamError.grpc_code))
            else:
                by_worker[index].append(item)
        calls = [self._call(i, self.workers[i].push.remote(items)) for i, items in by_worker.items()]
        parts = await asyncio.gather(*calls, return_exceptions=True)
        for items, part in zip(by_worker.values(), parts, strict=True):
            if isinstance(part, MosaicError):  # that worker is down or refused the call: its frames only
                result.rejected += [FrameRejection(item[0], item[1], str(part), part.grpc_code) for item in items]
                continue
            if isinstance(part, BaseException):
                raise part
            result.accepted += part.accepted
            result.dropped += part.dropped
            result.rejected.extend(part.rejected)
        result.rejected.sort(key=lambda r: r.index)
        return result

    # -- questions ----------------------------------------------------------------------------------
    async def ask(
        self,
        question_id: str,
        stream_id: str,
        question: str,
        *,
        max_new_tokens: int,
        time_range,
        timeout_s: float,
    ) -> AsyncIterator[object]:
        """One stream's answer: ``TokenEvent``s then the ``Answer``; cancels the worker side if abandoned."""
        index = self._index_of(stream_id)
        worker = self.workers[index]
        sent_s = time.monotonic()
        refs = send_ask(worker, question_id, stream_id, question, max_new_tokens, time_range, timeout_s)
        first_back_s = None
        finished = False
        try:
            async for ref in refs:
                event = await self._call(index, ref)
                first_back_s = first_back_s or time.monotonic()
                if isinstance(event, Answer):
                    event.timings.transport_s = max(0.0, first_back_s - sent_s - event.timings.worker_first_token_s)
                yield event
            finished = True
        finally:
            if not finished:
                worker.cancel.remote(question_id)

    async def _delta_of(self, kind: str, index: int, call, timeout_s: float):
        """A worker's answer to a call that hands over what changed since its last one (``call()`` sends it). One
        that outlasts ``timeout_s`` is not abandoned, since the worker has already handed its changes over: the
        next poll waits for the same answer again, instead of asking anew, so a slow answer is applied late, not
        lost."""
        key = (kind, index)
        task = self._pending.get(key)
        if task is None:
            task = self._pending[key] = asyncio.ensure_future(self._call(index, call()))
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout_s)
        finally:
            if task.done():  # answered, or failed: the next poll asks anew
                self._pending.pop(key, None)

    def _report_silent_streams(self, index: int, now: float) -> None:
        """The streams of a worker that does not answer: their lag grows from the last one it reported, and their
        queues, which went with it, are empty."""
        silent_s = now - self._down_since[index]
        for stream_id in [s for s, i in self.placement.items() if i == index]:
            self.metrics.streams.set_stream_lag(stream_id, self._last_lags.get(stream_id, 0.0) + silent_s)
            self.metrics.streams.set_ingest_queue_depth(stream_id, 0)

    async def _take_streams_of(self, index: int, timeout_s: float = 5.0) -> None:
        """The streams worker ``index`` restored that the router did not know (a create whose answer its crash
        lost), after it came back. One it no longer holds (set aside at its restart) stays placed: calls about it get
        NOT_FOUND from the worker, and a DeleteStream clears it; its lag and queue gauges go, which nothing would
        update any more."""
        asked_s = time.monotonic()
        try:
            listing = telemetry_call(self.workers[index].stream_ids).remote()
            held = set(await asyncio.wait_for(self._call(index, listing), timeout_s))
        except (MosaicError, TimeoutError) as err:
            log.warning("worker %d came back but did not list its streams (%s); asked again at its next answer",
                        index, err)  # fmt: skip
            self._to_list.add(index)
            return
        self._to_list.discard(index)
        for stream_id in [s for s, i in self.placement.items() if i == index and s not in held]:
            self.metrics.streams.forget_stream_gauges(stream_id)
        self._adopt(index, held, asked_s)

    async def _call(self, index: int, ref):
        """Awaits a worker call, unwrapping its error; a dead worker is UNAVAILABLE."""
        try:
            return await ref
        except ray.exceptions.RayTaskError as err:
            raise unwrap(err) from None
        except ray.exceptions.RayActorError as err:
            raise UnavailableError(f"worker {index} is unavailable (restarting or gone): {err}") from None

    # -- telemetry ----------------------------------------------------------------------------------
    def _note_stall(self, index: int, stalled_s: float) -> None:
        """A worker whose engine thread has had no chance to start a question for ``ENGINE_STALL_S`` is not ready
        (it answers polls from another thread); it is again once the thread moves."""
        if stalled_s > ENGINE_STALL_S and index not in self._stalled:
            self._stalled.add(index)
            log.error("worker %d's engine thread has been stuck for %.0f s: it takes no questions or streams until it "
                      "moves", index, stalled_s)  # fmt: skip
        elif stalled_s <= ENGINE_STALL_S and index in self._stalled:
            self._stalled.discard(index)
            log.warning("worker %d's engine thread moves again", index)

    def take_last_telemetry(self, index: int, delta: TelemetryDelta) -> None:
        """A stopped worker's last telemetry (its shutdown's frames, ingested or dropped as ``shutdown``), after the
        drain of a poll the stop cut short if it had answered: no poll takes either any more."""
        cut_short = self._pending.pop(("drain", index), None)
        deltas = [delta]
        if cut_short is not None and cut_short.done() and not cut_short.cancelled() and not cut_short.exception():
            deltas.insert(0, cut_short.result())
        for each in deltas:
            try:
                apply_delta(self.metrics, each, open_streams=set(self.placement))
            except Exception:  # the worker's stop goes on
                log.exception("worker %d's last telemetry could not be applied", index)

    async def poll_telemetry(self, timeout_s: float = 5.0) -> None:
        """Drains every worker's counters into the router's metrics; tracks which workers answer."""
        live = list(range(len(self.workers)))
        # A restarting worker queues calls until it is back; the timeout keeps one from stalling the poll.
        workers = list(enumerate(self.workers))
        calls = (self._delta_of("drain", i, telemetry_call(w.drain_telemetry).remote, timeout_s) for i, w in workers)
        keyframe_calls = (
            self._delta_of("keyframes", i, telemetry_call(w.keyframe_stats).remote, timeout_s) for i, w in workers
        )
        results, keyframes = await asyncio.gather(
            asyncio.gather(*calls, return_exceptions=True), asyncio.gather(*keyframe_calls, return_exceptions=True)
        )
        alive, now = set(), time.monotonic()
        for index, result, keyframe_stats in zip(live, results, keyframes, strict=True):
            if isinstance(result, BaseException):
                self._down_since.setdefault(index, now)
                if index in self._alive:
                    self.metrics.forget_worker(index)
                self._report_silent_streams(index, now)
                continue
            alive.add(index)
            self._note_stall(index, result.engine_stalled_s)
            came_back = index not in self._alive or result.pid != self._pids.get(index, result.pid)
            self._pids[index] = result.pid
            self._down_since.pop(index, None)
            try:  # one worker's surprise must not lose the others' drained counts, nor this round's liveness
                if came_back or index in self._to_list:
                    await self._take_streams_of(index)
                self._last_lags.update(result.lags_s)
                apply_delta(self.metrics, result, open_streams=set(self.placement))
                if not isinstance(keyframe_stats, BaseException):
                    self.metrics.set_keyframes(index, *keyframe_stats)
            except Exception:
                log.exception("worker %d's telemetry could not be applied this round", index)
        self._alive = alive
        self.metrics.set_workers_up(len(alive))
        self.metrics.set_active_streams(len(self.placement))
