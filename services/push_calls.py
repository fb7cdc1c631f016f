"""PushFrames: each frame decoded off the event loop and handed to its stream's worker, within bounded calls.

A call reports unusable frames per frame (``PushFramesResponse.errors``) and keeps the good ones; only when *no* frame
of the call was usable does the call itself fail, with the first frame's status (INVALID_ARGUMENT for a corrupt frame
or bad shape, NOT_FOUND for an unknown stream). At most ``max_calls`` calls run at once (RESOURCE_EXHAUSTED with a
retry hint beyond), and a call that sends no frame for ``idle_timeout_s`` ends (DEADLINE_EXCEEDED), giving its place
back.

A frame its stream's worker will sample out (``services.push_sampling``, as the router last heard of the stream's grid)
is not decoded: it goes to the worker without its pixels, and the worker counts it as it would the decoded frame, or
asks for its pixels, where the router's guess was out of date.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from mosaic_core.engine.stream import check_stream_id
from mosaic_core.errors import InvalidArgumentError, InvalidFrameError, MosaicError, cut
from mosaic_core.model.geometry import downscaled_size
from services import convert
from services.call_limit import PUSH_RETRY_AFTER_S
from services.coordinator import Coordinator
from services.errors import DeadlineError, QueueFullError, abort
from services.frames import check_header, decode_frame
from services.idle_watch import IdleWatch
from services.metrics import MosaicMetrics
from services.push_sampling import PushSampling
from services.worker_results import FrameRejection, PushResult

DEFAULT_IDLE_TIMEOUT_S = 60.0  # ServiceConfig.push_idle_timeout_s


class PushCalls:
    """The router's PushFrames calls.

    Args:
        coordinator: routes each frame to its stream's worker.
        metrics: the router's metrics (refusals, frames of a stream its worker could not count).
        max_calls: calls taken at once; beyond, RESOURCE_EXHAUSTED.
        idle_timeout_s: a call that sends no frame for this long ends with DEADLINE_EXCEEDED.
        decode_max_pixels: pushed pictures larger than this are scaled down as they are decoded (None: never).
        decode_threads: threads that decode JPEG/PNG frames and scale raw ones down.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        metrics: MosaicMetrics,
        *,
        max_calls: int,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        decode_max_pixels: int | None = None,
        decode_threads: int = 1,
    ) -> None:
        self.coordinator = coordinator
        self.metrics = metrics
        self.max_calls = max_calls
        self.idle_timeout_s = idle_timeout_s
        self.decode_max_pixels = decode_max_pixels
        self._num_calls = 0
        self.sampling = PushSampling()
        self._decoder = ThreadPoolExecutor(decode_threads, thread_name_prefix="mosaic-decode")

    async def serve(self, request_iterator, context):
        """One PushFrames call: its frames, then its answer (or its status)."""
        if self._num_calls >= self.max_calls:
            err = QueueFullError(
                f"the server is taking {self._num_calls} PushFrames calls already, its limit; "
                f"retry in about {PUSH_RETRY_AFTER_S * 1000:.0f} ms or send several streams in one call",
                retry_after_s=PUSH_RETRY_AFTER_S,
            )
            await abort(context, err, self.metrics)
        self._num_calls += 1
        try:
            totals = PushResult()  # its rejections: the first convert.MAX_FRAME_ERRORS, which the answer lists
            num_rejected = index = 0
            frames = aiter(request_iterator)
            with IdleWatch(self.idle_timeout_s) as idle:
                while (frame := await self._next_frame(frames, idle, totals)) is not None:
                    part = await self._push_one(index, frame)
                    totals.accepted += part.accepted
                    totals.dropped += part.dropped
                    totals.sampled_out += part.sampled_out
                    num_rejected += len(part.rejected)
                    totals.rejected.extend(part.rejected[: max(0, convert.MAX_FRAME_ERRORS - len(totals.rejected))])
                    index += 1
            if num_rejected and num_rejected == index:  # every frame of the call refused
                raise _all_refused(totals, num_rejected)
            return convert.push_response(totals, num_rejected=num_rejected)
        except Exception as err:
            await abort(context, err, self.metrics)
        finally:
            self._num_calls -= 1

    async def _next_frame(self, frames, idle: IdleWatch, totals: PushResult):
        """The call's next frame, or None once the client is done; a wait of ``idle_timeout_s`` ends the call."""
        try:
            with idle.waiting():
                return await anext(frames)
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            if not idle.fired or asyncio.current_task().uncancel() > 0:
                raise  # the client went away, or the server stops
            raise DeadlineError(
                f"no frame arrived for {self.idle_timeout_s:g} s, so this PushFrames call ended to free its place "
                f"(the server takes {self.max_calls} at once); {totals.accepted} frames of it were taken before. "
                "Open a new call for the next frames"
            ) from None

    async def _push_one(self, index: int, frame) -> PushResult:
        try:
            check_stream_id(frame.stream_id)
        except InvalidArgumentError as err:
            return PushResult(rejected=[FrameRejection(index, cut(frame.stream_id, 128), str(err), err.grpc_code)])
        if self._may_skip_decoding(frame):
            part = await self._push([(index, frame.stream_id, frame.timestamp_s, None)])
            if index not in part.needs_pixels:
                return part
        try:
            # JPEG/PNG decoding and scaling down take milliseconds: off the event loop, and off its default executor,
            # so the store reads there do not wait behind decodes, nor decodes behind reads of a slow store. Other raw
            # frames only get reshaped.
            if frame.WhichOneof("payload") == "encoded" or self._scaled_down(frame):
                loop = asyncio.get_running_loop()
                rgb = await loop.run_in_executor(self._decoder, decode_frame, frame, self.decode_max_pixels)
            else:
                rgb = decode_frame(frame, self.decode_max_pixels)
        except InvalidFrameError as err:
            await self._count_undecodable(frame.stream_id)
            return PushResult(rejected=[FrameRejection(index, frame.stream_id, str(err), err.grpc_code)])
        return await self._push([(index, frame.stream_id, frame.timestamp_s, rgb)])

    def _may_skip_decoding(self, frame) -> bool:
        """Whether the frame's worker will likely sample it out, and its header reads well: a frame that cannot be
        decoded is refused as such, with its header's error, never sent without its pixels."""
        if not self.sampling.skips(frame.stream_id, frame.timestamp_s):
            return False
        try:
            check_header(frame)
        except InvalidFrameError:
            return False
        return True

    async def _push(self, frames: list) -> PushResult:
        """``Coordinator.push``, learning from the reply the grids of the frames' streams (``PushSampling``)."""
        part = await self.coordinator.push(frames)
        self.sampling.learn(part.grids)
        if self.sampling.num_streams > len(self.coordinator.placement):
            self.sampling.keep_only(self.coordinator.placement)
        return part

    def close(self) -> None:
        """Lets the decode threads go, each once its frame is decoded; for after the server has stopped (a frame pushed
        after it is not decoded)."""
        self._decoder.shutdown(wait=False, cancel_futures=True)

    async def _count_undecodable(self, stream_id: str) -> None:
        """A frame of ``stream_id`` that could not be decoded: counted by the stream's worker, with the stream's other
        drops (GetStream, the metric, restarts); where that worker cannot take it, by the metric here, unless the
        stream was deleted meanwhile (its series would come back). Frames of unknown streams are not counted."""
        coordinator = self.coordinator
        if stream_id not in coordinator.placement or await coordinator.count_dropped(stream_id, "decode_error"):
            return
        if stream_id in coordinator.placement:  # read again: the placement may have changed during the call
            self.metrics.streams.frame_dropped(stream_id, "decode_error")

    def _scaled_down(self, frame) -> bool:
        """Whether a raw frame is larger than ``decode_max_pixels`` and so is scaled down as it is decoded."""
        if frame.WhichOneof("payload") != "raw":
            return False
        size = (frame.raw.height, frame.raw.width)
        return downscaled_size(*size, self.decode_max_pixels) != size


class _RefusedFramesError(MosaicError):
    """Every frame of a PushFrames call was refused: the call fails with the first refusal's status."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.grpc_code = code


def _all_refused(totals: PushResult, count: int) -> _RefusedFramesError:
    first = totals.rejected[0]
    what = "the frame" if count == 1 else f"all {count} frames"
    return _RefusedFramesError(f"{what} of this call refused; frame {first.index}: {first.reason}", first.code)
