"""Protos to the console's JSON, gRPC status codes to HTTP statuses, and Server-Sent-Events framing."""

from __future__ import annotations

import base64
import json

import grpc

from services.gen.mosaic.v1 import mosaic_pb2 as pb

# The mapping of google.rpc.Code to HTTP that Google's HTTP/JSON gateways use (google/rpc/code.proto).
HTTP_STATUS = {
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
RETRY_AFTER_KEY = "retry-after-ms"  # services.errors.RETRY_AFTER_KEY, read back from the trailing metadata


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def error_json(err: grpc.aio.AioRpcError) -> dict:
    """``{"code": "NOT_FOUND", "message": <the server's sentence>}`` plus ``retry_after_s`` when the server hinted."""
    body = {"code": err.code().name, "message": err.details() or err.code().name}
    for key, value in err.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            body["retry_after_s"] = int(value) / 1000.0
    return body


def sse(event: str, payload: dict) -> bytes:
    """One Server-Sent-Events message; JSON never holds a raw newline, so one ``data:`` line suffices."""
    return f"event: {event}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def _source_state(value: int) -> str:
    return pb.SourceState.Name(value).removeprefix("SOURCE_STATE_").lower()


def stream_json(stream: pb.Stream) -> dict:
    stats = stream.stats
    tiers = {pb.Tier.Name(t.tier).removeprefix("TIER_").lower(): t.num_bytes for t in stats.tiers}
    return {
        "stream_id": stream.stream_id,
        "fps": stream.fps,
        "state": _source_state(stream.source_state),
        "source_error": stream.source_error,
        "worker_id": stream.worker_id,
        "labels": dict(stream.labels),
        "frames_received": stats.frames_received,
        "frames_ingested": stats.frames_ingested,
        "frames_dropped": stats.frames_dropped,
        "num_clusters": stats.num_clusters,
        "tier_bytes": tiers,
        "first_timestamp_s": stats.first_timestamp_s if stats.HasField("first_timestamp_s") else None,
        "last_timestamp_s": stats.last_timestamp_s if stats.HasField("last_timestamp_s") else None,
        "lag_s": stats.lag_s,
        "ingest_queue_frames": stats.ingest_queue_frames,
    }


def span_json(span: pb.EvidenceSpan) -> dict:
    return {
        "stream_id": span.stream_id,
        "cluster_id": span.cluster_id,
        "start_s": span.start_s,
        "end_s": span.end_s,
        "score": span.score,
        "rank": span.rank,
        "keyframe_ids": list(span.keyframe_ids),
    }


def query_event_json(event: pb.QueryEvent) -> tuple[str, dict]:
    """``(SSE event name, payload)`` of one ``QueryEvent``: ``token``, ``evidence`` or ``timings``."""
    kind = event.WhichOneof("event")
    if kind == "token":
        return "token", {"text": event.token.text}
    if kind == "evidence":
        return "evidence", {"spans": [span_json(s) for s in event.evidence.spans]}
    t = event.timings
    return "timings", {
        "queue_s": t.queue_s,
        "retrieval_s": t.retrieval_s,
        "time_to_first_token_s": t.time_to_first_token_s,
        "decode_s": t.decode_s,
        "num_tokens": t.num_tokens,
        "bytes_fetched": t.bytes_fetched,
    }


def keyframe_json(keyframe: pb.Keyframe) -> dict:
    return {
        "id": keyframe.id,
        "stream_id": keyframe.stream_id,
        "cluster_id": keyframe.cluster_id,
        "timestamp_s": keyframe.timestamp_s,
        "width": keyframe.width,
        "height": keyframe.height,
        "jpeg_base64": base64.b64encode(keyframe.jpeg).decode("ascii"),
    }


def watch_json(watch: pb.Watch) -> dict:
    return {
        "watch_id": watch.watch_id,
        "question": watch.question,
        "stream_ids": list(watch.stream_ids),
        "num_events": watch.num_events,
    }


def watch_event_json(event: pb.WatchEvent) -> dict:
    return {
        "event_id": event.event_id,
        "watch_id": event.watch_id,
        "stream_id": event.stream_id,
        "cluster_id": event.cluster_id,
        "start_s": event.start_s,
        "end_s": event.end_s,
        "score": event.score,
        "question": event.question,
        "answer": event.answer,
        "answer_error": event.answer_error,
        "fired_unix_s": event.fired_unix_s,
        "missed_before": event.missed_before,
    }
