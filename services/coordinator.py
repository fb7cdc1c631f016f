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

**A worker Ray will not restart again** (``services.gone_workers``) is known from Ray's ``ActorDiedError``: calls
about its streams get FAILED_PRECONDITION with a sentence, ListStreams names its streams, and a DeleteStream of one
deletes the stream's history in the worker's folder (from the router, or a live worker where the router does not see
it), its metadata and what the router knows of it.

The telemetry poll (which workers answer, which are stalled, and what a worker that stops answering leaves in the
metrics) is ``TelemetryPollsMixin`` in ``services.coordinator_polls``, and a question's answer is
``QuestionsMixin.ask`` in ``services.coordinator_questions``, both mixed into ``Coordinator``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

import ray

from mosaic_core.engine.keyframes import Keyframe
from mosaic_core.engine.stream import check_stream_id
from mosaic_core.errors import AlreadyExistsError, CapacityError, MosaicError, StateError, UnknownStreamError
from services.coordinator_polls import TelemetryPollsMixin
from services.coordinator_questions import QuestionsMixin
from services.coordinator_start import wait_for_workers
from services.errors import UnavailableError, WorkerGoneError, unwrap
from services.gone_workers import delete_history_of_gone_worker, gone_error, unreachable_error
from services.metadata.base import MetadataStore, StreamRecord
from services.metrics import MosaicMetrics
from services.worker_actor import MAX_RESTARTS, telemetry_call
from services.worker_results import FrameRejection, PushResult, StreamInfo, WorkerInfo

log = logging.getLogger(__name__)
DELETES_KEPT_S = 60.0  # how long a delete's end is remembered against listings asked before it


class Coordinator(TelemetryPollsMixin, QuestionsMixin):
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
        self.data_dir: str | None = None  # the service's data directory, as this process sees it
        self._creating: set[str] = set()  # streams whose CreateStream is under way
        self._deleting: set[str] = set()  # and whose DeleteStream is
        self._deleted_s: dict[str, float] = {}  # stream -> when its last delete ended (monotonic), for a minute
        self._alive: set[int] = set()
        self._gone: set[int] = set()  # workers Ray will not restart again
        # workers that answer, but whose engine thread is stuck (``coordinator_polls.ENGINE_STALL_S``)
        self._stalled: set[int] = set()
        self._pids: dict[int, int] = {}  # worker index -> its process, as its last answer gave it
        self._down_since: dict[int, float] = {}  # worker index -> when it first missed a poll (monotonic)
        self._down_signals: dict[int, asyncio.Future] = {}  # worker index -> resolved when a poll marks it down
        self._cancels: set[asyncio.Task] = set()  # cancels sent to workers, until they answer
        self._last_lags: dict[str, float] = {}  # stream -> the lag its worker last reported
        self._to_list: set[int] = set()  # workers back whose streams could not be listed yet
        self._pending: dict[tuple[str, int], asyncio.Future] = {}  # (call, worker) -> an answer a poll waits for
        self.started = False

    async def start(self, timeout_s: float) -> list[WorkerInfo]:
        """Waits for every worker to build its engine and restore its streams, for as long as each makes progress
        (``coordinator_start``: ``timeout_s`` bounds a worker's silence, each asked for its start state); takes
        placement from them. Until it returns or raises, ``mosaic_workers_starting`` counts the workers; then they
        are up, or the router gives up."""
        self.metrics.set_workers_starting(len(self.workers))
        try:
            infos = await wait_for_workers(self.workers, timeout_s=timeout_s)
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
        except WorkerGoneError:
            num_clusters = await self._delete_on_gone_worker(index, stream_id)
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

    async def _delete_on_gone_worker(self, index: int, stream_id: str) -> int:
        """Deletes, from the router, a stream of a worker Ray will not restart (module doc): its history first, then
        its metadata, which its worker's publisher would have removed. Either failing leaves the stream placed, and a
        retry does what is left."""
        num_clusters = await self._delete_history_of_gone(index, stream_id)
        try:
            await asyncio.to_thread(self.store.delete_stream, stream_id)
        except Exception as err:
            raise UnavailableError(
                f"stream {stream_id!r} of gone worker {index}: its history is deleted, but the metadata store could "
                f"not be reached to remove its record ({err}); retry DeleteStream"
            ) from None
        return num_clusters

    async def _delete_history_of_gone(self, index: int, stream_id: str) -> int:
        """The gone worker's history of the stream deleted by this router, else by the first live worker that can."""
        try:
            return await asyncio.to_thread(delete_history_of_gone_worker, self.data_dir, index, stream_id)
        except StateError as err:
            reasons = [f"router: {err}"]
        for live in sorted(self.ready_workers - {index}):
            try:
                return await self._call(live, self.workers[live].delete_gone_workers_history.remote(index, stream_id))
            except StateError as err:
                reasons.append(f"worker {live}: {err}")
        raise unreachable_error(stream_id, index, reasons)

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
        failed = {i for i, result in zip(indices, results, strict=True) if isinstance(result, BaseException)}
        gone = {i: sorted(s for s, at in self.placement.items() if at == i) for i in failed & self._gone}
        if any(gone.values()):
            named = (f"worker {i} is gone for good, and its streams {', '.join(map(repr, ids))} cannot be listed"
                     for i, ids in gone.items() if ids)  # fmt: skip
            raise WorkerGoneError(
                "; ".join(named) + ": delete them, or restart the server, which restores them from the data directory"
            )
        down = [str(i) for i in sorted(failed - set(gone))]  # a gone worker no stream is placed on is left out
        if down:
            owned = sum(1 for index in self.placement.values() if str(index) in down)
            raise UnavailableError(
                f"worker {', '.join(down)} is not answering (restarting?); its {owned} streams cannot be listed. "
                "Retry shortly"
            )
        infos: list[StreamInfo] = []
        for index, result in zip(indices, results, strict=True):
            if index in gone:
                continue
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
        # Through _call: a worker found gone for good here is marked so, as a call about one of its streams would
        results = await asyncio.gather(*(self._call(i, self.workers[i].info.remote()) for i in live),
                                       return_exceptions=True)  # fmt: skip
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
        """Routes frames ``(index, stream, timestamp_s, rgb)``, decoded or without pixels (``rgb`` None), to their
        workers."""
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
            result.sampled_out += part.sampled_out
            result.rejected.extend(part.rejected)
            result.needs_pixels.extend(part.needs_pixels)
            result.grids.update(part.grids)
        result.rejected.sort(key=lambda r: r.index)
        return result

    async def count_dropped(self, stream_id: str, reason: str) -> bool:
        """Counts a frame of ``stream_id`` dropped here on the stream's worker (``WorkerCore.count_dropped``), so
        the count outlives this router; False where the stream has no worker or its worker could not take it (a
        failure is logged, never raised: the frame's own refusal goes back to the client either way)."""
        index = self.placement.get(stream_id)
        if index is None:
            return False
        try:
            await self._call(index, self.workers[index].count_dropped.remote(stream_id, reason))
        except Exception as err:  # best effort: the caller counts the frame itself
            log.warning("worker %d did not count a dropped frame of %s (%s): %s", index, stream_id, reason, err)
            return False
        return True

    async def _call(self, index: int, ref):
        """Awaits a worker call, unwrapping its error; a dead worker is UNAVAILABLE."""
        try:
            return await ref
        except ray.exceptions.RayTaskError as err:
            raise unwrap(err) from None
        except ray.exceptions.ActorDiedError as err:  # a worker that will come back is ActorUnavailableError
            if index not in self._gone:
                self._gone.add(index)
                self.metrics.set_workers_gone(len(self._gone))
                log.error("worker %d is gone for good (Ray will not restart it again): %s", index, err)
            raise gone_error(index, MAX_RESTARTS) from None
        except ray.exceptions.RayActorError as err:
            # Not gone for good (ActorDiedError, above): the client may retry, and is told so before Ray's own words.
            raise UnavailableError(
                f"worker {index} is unavailable (restarting, or cut off); retry shortly. Ray: {err}"
            ) from None
