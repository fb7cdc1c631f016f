"""The ``mosaic.v1.Mosaic`` servicer: proto in, coordinator call, proto out; every failure via ``abort``.

Questions (``Query``) go through the bounded ``QueryQueue`` (RESOURCE_EXHAUSTED with a retry hint when
full), run under the call's deadline (DEADLINE_EXCEEDED, a little before the client's own deadline so the
server reports it with a sentence), and fan out over the target streams (``fanout.merge_answers``).
Event order of one answer: token chunks, then the merged evidence, then the timings.

GetKeyframes reads a stream's keyframes (JPEG thumbnails) from the worker that owns it; the engine checks the
selector and the ids (``Engine.keyframes``).

Standing questions (CreateWatch, ListWatches, DeleteWatch, WatchEvents) go to the router's ``WatchRegistry``
(``services.watches``); until the backend is up they answer UNAVAILABLE.

PushFrames: ``services.push_calls``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from mosaic_core.config import MAX_NEW_TOKENS_LIMIT, check_max_new_tokens
from mosaic_core.engine.keyframe_store import MAX_IDS_PER_LOOKUP
from mosaic_core.engine.stream import check_stream_id
from mosaic_core.errors import CapacityError, InvalidArgumentError, UnknownStreamError
from services import convert
from services.coordinator import Coordinator
from services.errors import DeadlineError, QueueFullError, UnavailableError, abort
from services.fanout import Chunk, merge_answers, merged_evidence
from services.gen.mosaic.v1 import mosaic_pb2 as pb
from services.gen.mosaic.v1 import mosaic_pb2_grpc
from services.metrics import MosaicMetrics
from services.push_calls import DEFAULT_IDLE_TIMEOUT_S, PushCalls
from services.scheduler import QueryQueue
from services.source_policy import SourcePolicy
from services.watches_convert import check_listing_room, event_to_proto, record_from_request, watch_to_proto

log = logging.getLogger(__name__)
MAX_QUESTION_CHARS = 8192  # a question's characters; the engine's own limit is in tokens (512 by default)
DEADLINE_MARGIN_S = 0.05  # answer DEADLINE_EXCEEDED ourselves just before the client gives up
# The worker ends an overdue question this much before the router would, so its DeadlineError (a sentence)
# arrives and is read, instead of the router abandoning the answer stream with the error still in flight.
WORKER_DEADLINE_MARGIN_S = 0.05
PRIORITIES = {value: name for name, value in pb.Priority.items()}
# A question ends by then, whether it has no deadline or a later one: a wait of centuries overflowed the worker's
# thread waits (``threading.TIMEOUT_MAX``), and its answer failed INTERNAL.
MAX_QUESTION_S = 600.0


class MosaicServicer(mosaic_pb2_grpc.MosaicServicer):
    """Thin adapter from gRPC to the ``Coordinator``.

    Args:
        coordinator: streams, workers and routing.
        queue: the bounded question queue.
        metrics: the router's metrics.
        mode: retrieval mode label for the latency histograms.
        default_max_new_tokens: used when a question asks for 0.
        max_new_tokens_limit: the most a question may ask for, the workers' own limit (``EngineConfig``); a question
            asking more is refused here, before it takes a queue slot.
        max_push_calls: concurrent PushFrames calls accepted; beyond, RESOURCE_EXHAUSTED.
        max_streams: streams the server holds at most; CreateStream beyond is RESOURCE_EXHAUSTED (None: no limit).
        push_idle_timeout_s: a PushFrames call that sends no frame for this long ends with DEADLINE_EXCEEDED, giving
            its place back.
        evidence_spans: spans in a merged answer.
        max_fps: the highest fps a stream may ask for.
        source_policy: what ``source_url`` is checked against here (its scheme, root and host as written), before
            placement (paths only: the router may not hold the files; the worker checks they exist); None
            leaves the check to the workers.
        decode_max_pixels: pushed frames with more pixels are scaled down to this many as they are decoded
            (``ServiceConfig.decode_oversample``); None keeps their size.
        max_reply_bytes: the server's message limit (``max_message_bytes``): GetKeyframes, ListStreams and CreateWatch
            refuse a reply (or a watch list) larger than that with a sentence (None: no check).
        decode_threads: threads that decode pushed JPEG/PNG frames and scale frames down (``close`` lets them go),
            apart from the event loop's default executor (``ServiceConfig.decode_threads``).
    """

    def __init__(
        self,
        coordinator: Coordinator,
        queue: QueryQueue,
        metrics: MosaicMetrics,
        *,
        mode: str,
        default_max_new_tokens: int,
        max_push_calls: int,
        max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT,
        push_idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        max_streams: int | None = None,
        evidence_spans: int = 5,
        max_fps: float = convert.DEFAULT_MAX_FPS,
        source_policy: SourcePolicy | None = None,
        decode_max_pixels: int | None = None,
        max_reply_bytes: int | None = None,
        decode_threads: int = 1,
    ) -> None:
        self.coordinator = coordinator
        self.queue = queue
        self.metrics = metrics
        self.mode = mode
        self.default_max_new_tokens = default_max_new_tokens
        self.max_new_tokens_limit = max_new_tokens_limit
        self.max_streams = max_streams
        self._num_creating = 0
        self.evidence_spans = evidence_spans
        self.max_fps = max_fps
        self.source_policy = source_policy
        self.max_reply_bytes = max_reply_bytes  # the server's message limit, for replies that grow with the data
        self.watches = None  # the router's WatchRegistry, once the backend is up
        self.watch_defaults = (1.0, 60.0)  # (threshold, cooldown_s) for requests that leave them unset
        self.pushes = PushCalls(
            coordinator,
            metrics,
            max_calls=max_push_calls,
            idle_timeout_s=push_idle_timeout_s,
            decode_max_pixels=decode_max_pixels,
            decode_threads=decode_threads,
        )

    # -- streams ------------------------------------------------------------------------------------
    async def CreateStream(self, request, context):
        try:
            record = convert.record_from_request(request, max_fps=self.max_fps)
            if record.source_url is not None and self.source_policy is not None:
                self.source_policy.check(record.source_url, must_exist=False)
            self._check_stream_room(record.stream_id)
            self._num_creating += 1  # counted until placed, so creates side by side cannot pass the limit
            try:
                info = await self.coordinator.create_stream(record)
            finally:
                self._num_creating -= 1
            return convert.stream_to_proto(info)
        except Exception as err:
            await abort(context, err, self.metrics)

    def _check_stream_room(self, stream_id: str) -> None:
        """Raises ``CapacityError`` (RESOURCE_EXHAUSTED) when the server holds ``max_streams`` streams already."""
        num_streams = len(self.coordinator.placement) + self._num_creating
        if self.max_streams is None or num_streams < self.max_streams or stream_id in self.coordinator.placement:
            return
        raise CapacityError(
            f"the server has {num_streams} streams, created or being created, its limit ({self.max_streams}: "
            "max_streams_per_worker for each worker); delete streams or add workers"
        )

    async def DeleteStream(self, request, context):
        try:
            # Shielded: a client that goes away mid-delete must not leave the stream gone but its cooldowns kept.
            num_clusters = await asyncio.shield(self._delete_stream(check_stream_id(request.stream_id)))
            return pb.DeleteStreamResponse(num_clusters_deleted=num_clusters)
        except Exception as err:
            await abort(context, err, self.metrics)

    async def _delete_stream(self, stream_id: str) -> int:
        watches = self._registry()  # not before the registry is up: the stream's cooldowns go with it
        num_clusters = await self.coordinator.delete_stream(stream_id)
        await watches.forget_stream(stream_id)
        return num_clusters

    async def GetStream(self, request, context):
        try:
            return convert.stream_to_proto(await self.coordinator.get_stream(check_stream_id(request.stream_id)))
        except Exception as err:
            await abort(context, err, self.metrics)

    async def ListStreams(self, request, context):
        try:
            infos = await self.coordinator.list_streams()
            return convert.streams_page(
                infos, page_size=request.page_size, page_token=request.page_token, max_bytes=self.max_reply_bytes
            )
        except Exception as err:
            await abort(context, err, self.metrics)

    async def GetKeyframes(self, request, context):
        try:
            stream_id = check_stream_id(request.stream_id)
            if len(request.keyframe_ids) > MAX_IDS_PER_LOOKUP:  # before the ids travel to a worker
                raise InvalidArgumentError(
                    f"{len(request.keyframe_ids)} keyframe ids asked for; at most {MAX_IDS_PER_LOOKUP} fit in one call"
                )
            keyframes = await self.coordinator.get_keyframes(
                stream_id,
                keyframe_ids=list(request.keyframe_ids),
                cluster_id=request.cluster_id,
                latest=request.latest,
            )
            return convert.keyframes_response(keyframes, self.max_reply_bytes)
        except Exception as err:
            await abort(context, err, self.metrics)

    # -- ingest -------------------------------------------------------------------------------------
    async def PushFrames(self, request_iterator, context):
        return await self.pushes.serve(request_iterator, context)

    def close(self) -> None:
        """Lets the decode threads go (``PushCalls.close``); for after the server has stopped."""
        self.pushes.close()

    # -- questions ----------------------------------------------------------------------------------
    async def Query(self, request, context):
        received_s = time.monotonic()
        try:
            stream_ids, time_range = self._check_query(request)
            remaining = context.time_remaining()
            budget_s = (
                MAX_QUESTION_S if remaining is None else max(0.0, min(remaining, MAX_QUESTION_S) - DEADLINE_MARGIN_S)
            )
            ticket = self.queue.admit(",".join(stream_ids), request.priority or pb.PRIORITY_NORMAL)
        except Exception as err:
            self.metrics.query_finished("rejected" if isinstance(err, QueueFullError) else "error")
            await abort(context, err, self.metrics)
        try:
            queue_s = await self.queue.wait_turn(ticket, budget_s)
            left_s = budget_s - (time.monotonic() - received_s)
            answer = self._answer(request, stream_ids, time_range, left_s, received_s, queue_s)
            # Closed here, whatever ends the call, so the workers' answers are cancelled before the ticket goes.
            async with asyncio.timeout(max(0.0, left_s)), contextlib.aclosing(answer):
                async for event in answer:
                    yield event
            self.metrics.query_finished("ok")
        except (DeadlineError, TimeoutError):
            self.metrics.query_finished("deadline")
            await abort(context, DeadlineError(_deadline_sentence(received_s)), self.metrics)
        except (asyncio.CancelledError, GeneratorExit):  # the client went away: cancelled, or closed while sent to
            remaining = context.time_remaining()
            # A hang-up is the client's choice, not a failure of the server: counted apart, so it does not read as one.
            self.metrics.query_finished("deadline" if remaining is not None and remaining <= 0 else "cancelled")
            raise
        except Exception as err:
            self.metrics.query_finished("rejected" if isinstance(err, QueueFullError) else "error")
            await abort(context, err, self.metrics)
        finally:
            self.queue.release(ticket)

    def _check_query(self, request) -> tuple[list[str], tuple[float, float] | None]:
        if not request.question.strip():
            raise InvalidArgumentError("the question is empty; ask something about the streams")
        if len(request.question) > MAX_QUESTION_CHARS:  # before it is sent to every worker it names, and tokenized
            raise InvalidArgumentError(
                f"the question is {len(request.question)} characters long; at most {MAX_QUESTION_CHARS} are taken "
                "(and the engine's token limit may be lower)"
            )
        if request.priority not in PRIORITIES:
            names = ", ".join(f"{value} ({name})" for value, name in sorted(PRIORITIES.items()))
            raise InvalidArgumentError(f"priority {request.priority} is not one of {names}")
        stream_ids = [check_stream_id(s) for s in dict.fromkeys(request.stream_ids)] or sorted(
            self.coordinator.placement
        )
        if not stream_ids and not self.coordinator.started:  # its workers have not said which streams they hold yet
            raise UnavailableError(
                "the server is starting and its workers are restoring their streams; retry in a few seconds"
            )
        if not stream_ids:
            raise UnknownStreamError("there are no streams to ask about; create one first")
        for stream_id in stream_ids:
            self.coordinator.worker_of(stream_id)
        if request.max_new_tokens < 0:
            raise InvalidArgumentError(f"max_new_tokens must be >= 0 (0: server default), got {request.max_new_tokens}")
        if request.max_new_tokens:  # 0 takes the server's default
            check_max_new_tokens(request.max_new_tokens, self.max_new_tokens_limit)
        return stream_ids, convert.time_range_from_request(request)

    async def _answer(self, request, stream_ids, time_range, timeout_s, received_s, queue_s):
        question_id = uuid.uuid4().hex
        max_new_tokens = request.max_new_tokens or self.default_max_new_tokens
        sources = {
            sid: self.coordinator.ask(
                f"{question_id}:{sid}",
                sid,
                request.question,
                max_new_tokens=max_new_tokens,
                time_range=time_range,
                timeout_s=max(0.0, timeout_s - WORKER_DEADLINE_MARGIN_S),
            )
            for sid in stream_ids
        }
        answers = []
        first_token_s = last_token_s = first_stream_id = None
        async with contextlib.aclosing(merge_answers(sources, headers=len(stream_ids) > 1)) as merged:
            async for item in merged:
                if not isinstance(item, Chunk):
                    answers.append(item)
                    continue
                now = time.monotonic()
                if item.token_id is not None:
                    if first_token_s is None:
                        first_token_s, first_stream_id = now, item.stream_id
                        self.metrics.observe_ttft(self.mode, now - received_s)
                    else:
                        self.metrics.observe_inter_token(self.mode, now - last_token_s)
                    last_token_s = now
                yield convert.token_event(item.text, item.token_id)
        for answer in answers:
            self.metrics.observe_retrieval(self.mode, answer.timings.retrieval_s)
        yield convert.evidence_event(merged_evidence(answers, self.evidence_spans * len(stream_ids)))
        ttft_s = 0.0 if first_token_s is None else first_token_s - received_s
        decode_s = 0.0 if first_token_s is None else last_token_s - first_token_s
        yield convert.timings_event(
            answers, queue_s=queue_s, ttft_s=ttft_s, decode_s=decode_s, first_stream_id=first_stream_id
        )

    # -- standing questions ---------------------------------------------------------------------------
    def _registry(self):
        if self.watches is None:
            raise UnavailableError("the server is starting; retry in a few seconds")
        return self.watches

    async def CreateWatch(self, request, context):
        try:
            threshold, cooldown_s = self.watch_defaults
            record = record_from_request(request, default_threshold=threshold, default_cooldown_s=cooldown_s)
            registry = self._registry()
            check_listing_room(registry.records(), record, self.max_reply_bytes)
            return watch_to_proto(*await registry.create(record))
        except Exception as err:
            await abort(context, err, self.metrics)

    async def ListWatches(self, request, context):
        try:
            watches = await self._registry().list()
            return pb.ListWatchesResponse(watches=[watch_to_proto(r, s) for r, s in watches])
        except Exception as err:
            await abort(context, err, self.metrics)

    async def DeleteWatch(self, request, context):
        try:
            await self._registry().delete(request.watch_id)
            return pb.DeleteWatchResponse()
        except Exception as err:
            await abort(context, err, self.metrics)

    async def WatchEvents(self, request, context):
        after = request.after_event_id if request.HasField("after_event_id") else None
        try:
            events = self._registry().subscribe(list(dict.fromkeys(request.watch_ids)), after)
            async with contextlib.aclosing(events):
                async for item in events:
                    yield event_to_proto(item)
        except Exception as err:
            await abort(context, err, self.metrics)


def _deadline_sentence(received_s: float) -> str:
    waited_s = time.monotonic() - received_s
    return f"the deadline passed {waited_s:.2f}s after the question arrived, before it was answered"
