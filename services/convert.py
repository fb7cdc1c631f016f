"""Protobuf <-> core dataclasses, in one place so the servicer stays thin."""

from __future__ import annotations

import itertools
import math
import time

from mosaic_core.config import MIB
from mosaic_core.engine.keyframes import Keyframe
from mosaic_core.engine.results import Answer, EvidenceSpan
from mosaic_core.engine.stream import STREAM_ID_PATTERN, check_stream_id
from mosaic_core.errors import CapacityError, InvalidArgumentError, shown
from services.gen.mosaic.v1 import mosaic_pb2 as pb
from services.labels import check_labels
from services.metadata.base import StreamRecord
from services.url_text import without_credentials
from services.worker_results import PushResult, StreamInfo

DEFAULT_FPS = 1.0
PAGE_TOKEN_ROOM_BYTES = 130  # a next_page_token in a reply: a stream id of up to 128 bytes, its tag and its length
DEFAULT_MAX_FPS = 60.0  # a camera sampled faster than this is a mistake or an attack on the worker
# One frame a day: a source reader waits 1/fps between frames, and far slower rates overflow its timer.
MIN_FPS = 1 / 86400
MAX_FRAME_ERRORS = 100
_TIER_ENUM = {"device": pb.TIER_DEVICE, "host": pb.TIER_HOST, "disk": pb.TIER_DISK}


def record_from_request(request: pb.CreateStreamRequest, *, max_fps: float = DEFAULT_MAX_FPS) -> StreamRecord:
    """A new stream's record; fps 0 (unset) means ``DEFAULT_FPS``.

    Raises:
        InvalidArgumentError: a bad stream id; fps not finite, not above 0, below ``MIN_FPS`` or above ``max_fps``;
            retention not finite or < 0.
    """
    check_stream_id(request.stream_id)  # before StreamRecord's own check, whose rule (the store's) allows '/'
    fps = request.fps if request.fps != 0 else DEFAULT_FPS
    if not (math.isfinite(fps) and fps > 0):
        raise InvalidArgumentError(
            f"fps must be a finite number above 0 (0 means the default, {DEFAULT_FPS:g} fps), got {fps!r}"
        )
    if fps < MIN_FPS:
        raise InvalidArgumentError(f"fps {fps:g} is below one frame a day ({MIN_FPS:.3g} frames per second)")
    if fps > max_fps:
        raise InvalidArgumentError(f"fps {fps:g} is above this server's limit of {max_fps:g} frames per second")
    if not (math.isfinite(request.retention_s) and request.retention_s >= 0):
        raise InvalidArgumentError(
            f"retention_s must be a finite number of seconds >= 0 (0 keeps everything), got {request.retention_s!r}"
        )
    source_url = request.source_url if request.HasField("source_url") else None
    check_labels(dict(request.labels), "a stream")
    return StreamRecord(
        stream_id=request.stream_id,
        fps=fps,
        source_url=source_url or None,
        loop_source=request.loop_source,
        retention_s=request.retention_s,
        created_s=time.time(),
        labels=dict(request.labels),
    )


def streams_page(
    infos: list[StreamInfo], *, page_size: int, page_token: str, max_bytes: int | None = None
) -> pb.ListStreamsResponse:
    """ListStreams' reply: the streams after ``page_token`` (the last stream id of the page before) in stream-id
    order, at most ``page_size`` of them (every one with 0), and the token of the page after while more follow.

    Raises:
        InvalidArgumentError: a negative ``page_size``, or a ``page_token`` that is no stream id.
        CapacityError: with ``max_bytes`` (the server's message limit), the reply would be larger; the sentence says
            what page size fits, instead of gRPC's own refusal to send it.
    """
    if page_size < 0:
        raise InvalidArgumentError(f"page_size {page_size} is negative: use 0 for every stream, or a count")
    if page_token and not STREAM_ID_PATTERN.fullmatch(page_token):
        raise InvalidArgumentError(
            f"page_token {shown(page_token)} is not one this server gives: pass the next_page_token of the page before"
        )
    after = sorted((info for info in infos if info.record.stream_id > page_token), key=lambda i: i.record.stream_id)
    listed = after if page_size == 0 else after[:page_size]
    reply = pb.ListStreamsResponse(streams=[stream_to_proto(info) for info in listed])
    if len(listed) < len(after):
        reply.next_page_token = listed[-1].record.stream_id
    if max_bytes is None or reply.ByteSize() <= max_bytes:
        return reply
    # A repeated field's bytes are the sum of its entries', so the reply of the first k streams is a running sum.
    sizes = itertools.accumulate(pb.ListStreamsResponse(streams=[s]).ByteSize() for s in reply.streams)
    fit = sum(1 for size in sizes if size <= max_bytes - PAGE_TOKEN_ROOM_BYTES)
    what = f"list them with a page_size of at most {fit}" if fit else "even one stream is larger than that"
    raise CapacityError(
        f"the {len(listed)} streams asked for come to {reply.ByteSize() / MIB:.2f} MiB, more than the server's "
        f"message limit of {max_bytes / MIB:.2f} MiB (max_message_bytes); {what}"
    )


def stream_to_proto(info: StreamInfo) -> pb.Stream:
    record = info.record
    stats = pb.StreamStats(
        frames_received=info.frames_received,
        frames_ingested=info.frames_ingested,
        frames_dropped=info.frames_dropped,
        num_clusters=info.num_clusters,
        tiers=[
            pb.TierUsage(
                tier=_TIER_ENUM[tier],
                num_clusters=info.clusters_by_tier.get(tier, 0),
                num_bytes=info.bytes_by_tier.get(tier, 0),
            )
            for tier in ("device", "host", "disk")
        ],
        lag_s=info.lag_s,
        ingest_queue_frames=info.queue_frames,
    )
    if info.first_timestamp_s is not None:
        stats.first_timestamp_s = info.first_timestamp_s
    if info.last_timestamp_s is not None:
        stats.last_timestamp_s = info.last_timestamp_s
    stream = pb.Stream(
        stream_id=record.stream_id,
        fps=record.fps,
        loop_source=record.loop_source,
        retention_s=record.retention_s,
        labels=record.labels,
        worker_id=record.worker_id or "",
        created_s=record.created_s,
        source_state=info.source_state,
        source_error=info.source_error,
        stats=stats,
    )
    if record.source_url:
        stream.source_url = without_credentials(record.source_url)  # any caller with the API key reads it
    return stream


def push_response(result: PushResult, *, num_rejected: int | None = None) -> pb.PushFramesResponse:
    """The answer to PushFrames; ``num_rejected`` when ``result`` lists only some of the rejections."""
    return pb.PushFramesResponse(
        frames_accepted=result.accepted,
        frames_dropped=result.dropped,
        frames_rejected=len(result.rejected) if num_rejected is None else num_rejected,
        frames_sampled_out=result.sampled_out,
        errors=[
            pb.FrameError(index=r.index, reason=r.reason, stream_id=r.stream_id)
            for r in result.rejected[:MAX_FRAME_ERRORS]
        ],
    )


def time_range_from_request(request: pb.QueryRequest) -> tuple[float, float] | None:
    if not request.HasField("time_range"):
        return None
    start_s, end_s = request.time_range.start_s, request.time_range.end_s
    if not (math.isfinite(start_s) and math.isfinite(end_s)):
        raise InvalidArgumentError(
            f"time range start and end must be finite numbers of seconds, got start {start_s!r} and end {end_s!r}"
        )
    if not start_s <= end_s:
        raise InvalidArgumentError(f"time range start {start_s} is after its end {end_s}")
    return (start_s, end_s)


def evidence_event(spans: list[EvidenceSpan]) -> pb.QueryEvent:
    return pb.QueryEvent(
        evidence=pb.Evidence(
            spans=[
                pb.EvidenceSpan(
                    stream_id=s.stream_id,
                    cluster_id=s.cluster_id,
                    start_s=s.start_s,
                    end_s=s.end_s,
                    score=s.score,
                    rank=s.rank,
                    keyframe_ids=s.keyframe_ids,
                )
                for s in spans
            ]
        )
    )


def keyframes_response(keyframes: list[Keyframe], max_bytes: int | None = None) -> pb.GetKeyframesResponse:
    """The reply to GetKeyframes.

    Raises:
        CapacityError: with ``max_bytes`` (the server's message limit), the reply would be larger; the sentence says
            how many of the keyframes fit in one reply, instead of gRPC's own refusal to send it.
    """
    reply = pb.GetKeyframesResponse(
        keyframes=[
            pb.Keyframe(
                id=k.keyframe_id,
                stream_id=k.stream_id,
                cluster_id=k.cluster_id,
                timestamp_s=k.timestamp_s,
                jpeg=k.jpeg,
                width=k.width,
                height=k.height,
            )
            for k in keyframes
        ]
    )
    if max_bytes is None or reply.ByteSize() <= max_bytes:
        return reply
    # A repeated field's bytes are the sum of its entries', so the reply of the first k keyframes is a running sum.
    sizes = itertools.accumulate(pb.GetKeyframesResponse(keyframes=[k]).ByteSize() for k in reply.keyframes)
    fit = sum(1 for size in sizes if size <= max_bytes)
    what = f"ask for at most {fit} of them at a time" if fit else "even one is larger than that"
    raise CapacityError(
        f"the {len(keyframes)} keyframes asked for come to {reply.ByteSize() / MIB:.2f} MiB, more than the server's "
        f"message limit of {max_bytes / MIB:.2f} MiB (max_message_bytes); {what}"
    )


def timings_event(
    answers: list[Answer], *, queue_s: float, ttft_s: float, decode_s: float, first_stream_id: str | None = None
) -> pb.QueryEvent:
    """The question's timings. The parts of the time to first token are those of ``first_stream_id``'s answer, whose
    token was the first, so that they are parts of it; without that answer, the longest over the streams."""
    first = [a for a in answers if a.stream_id == first_stream_id] or answers
    return pb.QueryEvent(
        timings=pb.QueryTimings(
            queue_s=queue_s,
            retrieval_s=max((a.timings.retrieval_s for a in answers), default=0.0),
            time_to_first_token_s=ttft_s,
            decode_s=decode_s,
            num_tokens=sum(a.timings.num_tokens for a in answers),
            bytes_fetched=sum(a.retrieval.bytes_fetched for a in answers),
            start_wait_s=max((a.timings.start_wait_s for a in first), default=0.0),
            engine_first_token_s=max((a.timings.time_to_first_token_s for a in first), default=0.0),
            worker_first_token_s=max((a.timings.worker_first_token_s for a in first), default=0.0),
            token_handoff_s=max((a.timings.token_handoff_s for a in first), default=0.0),
            transport_s=max((a.timings.transport_s for a in first), default=0.0),
        )
    )


def token_event(text: str, token_id: int | None) -> pb.QueryEvent:
    return pb.QueryEvent(token=pb.TokenChunk(text=text, token_ids=[] if token_id is None else [token_id]))
