"""A small synchronous Python client for ``mosaic.v1.Mosaic`` (the CLI and the demo use it).

    with MosaicClient("127.0.0.1:50051", api_key="...") as client:
        client.create_stream("cam-1", fps=1.0)
        client.push_frames(("cam-1", t, rgb) for t, rgb in frames)
        for event in client.query("what moved?", ["cam-1"]):
            ...
        result = client.ask("what moved?", ["cam-1"])  # collected: text, evidence, timings
        watch = client.create_watch("Is a truck at the gate?", ["cam-1"], threshold=1.0)
        for event in client.watch_events([watch.watch_id], after_event_id=0):  # resumable, see docs/watches.md
            ...
        frames = client.get_keyframes("cam-1", keyframe_ids=result.evidence[0].keyframe_ids)  # JPEG thumbnails

Errors are ``grpc.RpcError`` with the server's status code and sentence; ``retry_after_s(err)`` reads the
RESOURCE_EXHAUSTED retry hint.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gen.mosaic.v1 import mosaic_pb2 as pb
from services.gen.mosaic.v1 import mosaic_pb2_grpc

API_KEY_HEADER = "x-api-key"
RETRY_AFTER_KEY = "retry-after-ms"
LIST_PAGE_SIZE = 200  # streams per ListStreams reply: 200 with the largest labels allowed fit the default 16 MiB
SERVICE_NAME = "mosaic.v1.Mosaic"


@dataclass(slots=True)
class QueryResult:
    """A whole answer: text, token ids, evidence spans and timings."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    evidence: list[pb.EvidenceSpan] = field(default_factory=list)
    timings: pb.QueryTimings | None = None


def frame_message(stream_id: str, timestamp_s: float, rgb: np.ndarray, encoding: str = "jpeg") -> pb.Frame:
    """A ``Frame`` from an ``[H, W, 3]`` uint8 array, JPEG- or PNG-encoded or raw."""
    if encoding == "raw":
        height, width, channels = rgb.shape
        raw = pb.RawFrame(rgb=np.ascontiguousarray(rgb).tobytes(), height=height, width=width, channels=channels)
        return pb.Frame(stream_id=stream_id, timestamp_s=timestamp_s, raw=raw)
    from services.frames import encode_image  # imports av and torch: only callers that encode pay for it

    return pb.Frame(stream_id=stream_id, timestamp_s=timestamp_s, encoded=encode_image(rgb, encoding))


def retry_after_s(err: grpc.RpcError) -> float | None:
    """The server's retry hint of a RESOURCE_EXHAUSTED error, in seconds (None if absent)."""
    for key, value in err.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            return int(value) / 1000.0
    return None


class MosaicClient:
    """Blocking client over one channel.

    Args:
        target: ``host:port``.
        api_key: sent as ``x-api-key`` on every call when set.
        root_certificates: PEM CA bundle; switches to TLS.
        max_message_bytes: channel send/receive limit (match the server's).
        timeout_s: default deadline of unary calls.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        root_certificates: bytes | None = None,
        max_message_bytes: int = 16 << 20,
        timeout_s: float = 30.0,
    ) -> None:
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = mosaic_pb2_grpc.MosaicStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = ((API_KEY_HEADER, api_key),) if api_key else ()
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> MosaicClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def health_status(self, service: str = SERVICE_NAME, timeout_s: float = 3.0) -> str:
        """``SERVING``, ``NOT_SERVING``, ... of ``service`` ("" is the whole server)."""
        response = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # -- streams ------------------------------------------------------------------------------------
    def create_stream(
        self,
        stream_id: str,
        *,
        fps: float = 1.0,
        source_url: str | None = None,
        loop_source: bool = False,
        retention_s: float = 0.0,
        labels: dict[str, str] | None = None,
    ) -> pb.Stream:
        request = pb.CreateStreamRequest(
            stream_id=stream_id, fps=fps, loop_source=loop_source, retention_s=retention_s, labels=labels or {}
        )
        if source_url is not None:
            request.source_url = source_url
        return self.stub.CreateStream(request, timeout=self.timeout_s, metadata=self.metadata)

    def delete_stream(self, stream_id: str) -> int:
        request = pb.DeleteStreamRequest(stream_id=stream_id)
        return self.stub.DeleteStream(request, timeout=self.timeout_s, metadata=self.metadata).num_clusters_deleted

    def get_stream(self, stream_id: str) -> pb.Stream:
        request = pb.GetStreamRequest(stream_id=stream_id)
        return self.stub.GetStream(request, timeout=self.timeout_s, metadata=self.metadata)

    def list_streams(self, page_size: int = LIST_PAGE_SIZE) -> list[pb.Stream]:
        """Every stream, in stream-id order, asked for ``page_size`` at a time."""
        streams, token = [], ""
        while True:
            request = pb.ListStreamsRequest(page_size=page_size, page_token=token)
            response = self.stub.ListStreams(request, timeout=self.timeout_s, metadata=self.metadata)
            streams += response.streams
            token = response.next_page_token
            if not token:
                return streams

    # -- ingest -------------------------------------------------------------------------------------
    def push_frames(
        self,
        frames: Iterable[pb.Frame | tuple[str, float, np.ndarray]],
        *,
        encoding: str = "jpeg",
        timeout_s: float | None = None,
    ) -> pb.PushFramesResponse:
        """Streams frames in one call; tuples ``(stream_id, timestamp_s, rgb)`` are encoded on the way."""
        messages = (f if isinstance(f, pb.Frame) else frame_message(*f, encoding=encoding) for f in frames)
        return self.stub.PushFrames(messages, timeout=timeout_s, metadata=self.metadata)

    # -- questions ----------------------------------------------------------------------------------
    def query(
        self,
        question: str,
        stream_ids: Iterable[str] = (),
        *,
        max_new_tokens: int = 0,
        time_range: tuple[float, float] | None = None,
        priority: int = pb.PRIORITY_NORMAL,
        timeout_s: float | None = None,
    ) -> Iterator[pb.QueryEvent]:
        """Streams the answer's events; ``stream_ids`` empty asks every stream."""
        request = pb.QueryRequest(
            stream_ids=list(stream_ids), question=question, max_new_tokens=max_new_tokens, priority=priority
        )
        if time_range is not None:
            request.time_range.start_s, request.time_range.end_s = time_range
        yield from self.stub.Query(request, timeout=timeout_s, metadata=self.metadata)

    def ask(self, question: str, stream_ids: Iterable[str] = (), **kwargs) -> QueryResult:
        """``query`` collected into one ``QueryResult``."""
        result = QueryResult()
        for event in self.query(question, stream_ids, **kwargs):
            kind = event.WhichOneof("event")
            if kind == "token":
                result.text += event.token.text
                result.token_ids.extend(event.token.token_ids)
            elif kind == "evidence":
                result.evidence = list(event.evidence.spans)
            elif kind == "timings":
                result.timings = event.timings
        return result

    # -- standing questions -------------------------------------------------------------------------
    def create_watch(
        self,
        question: str,
        stream_ids: Iterable[str] = (),
        *,
        watch_id: str = "",
        threshold: float | None = None,
        cooldown_s: float | None = None,
        active_hours: tuple[str, str, str] | None = None,
        labels: dict[str, str] | None = None,
        webhook_url: str | None = None,
        webhook_secret: str = "",
        max_answer_tokens: int = 0,
    ) -> pb.Watch:
        """Creates a watch; ``stream_ids`` empty watches every stream; ``active_hours`` is
        ``(start "HH:MM", end "HH:MM", IANA timezone or "")``; None leaves a setting to the server default."""
        request = pb.CreateWatchRequest(
            watch_id=watch_id,
            question=question,
            stream_ids=list(stream_ids),
            labels=labels or {},
            max_answer_tokens=max_answer_tokens,
        )
        if threshold is not None:
            request.threshold = threshold
        if cooldown_s is not None:
            request.cooldown_s = cooldown_s
        if active_hours is not None:
            start, end, timezone = active_hours
            request.active_hours.CopyFrom(pb.ActiveHours(start=start, end=end, timezone=timezone))
        if webhook_url is not None:
            request.webhook.CopyFrom(pb.Webhook(url=webhook_url, secret=webhook_secret))
        return self.stub.CreateWatch(request, timeout=self.timeout_s, metadata=self.metadata)

    def list_watches(self) -> list[pb.Watch]:
        response = self.stub.ListWatches(pb.ListWatchesRequest(), timeout=self.timeout_s, metadata=self.metadata)
        return list(response.watches)

    def delete_watch(self, watch_id: str) -> None:
        self.stub.DeleteWatch(pb.DeleteWatchRequest(watch_id=watch_id), timeout=self.timeout_s, metadata=self.metadata)

    def watch_events(
        self,
        watch_ids: Iterable[str] = (),
        *,
        after_event_id: int | None = None,
        timeout_s: float | None = None,
    ) -> Iterator[pb.WatchEvent]:
        """Streams events of ``watch_ids`` (empty: every watch). ``after_event_id``: the last id you received
        (buffered events after it come first); None: only events from now on. Cancel the returned iterator's
        call (``.cancel()``) or let ``timeout_s`` end it."""
        request = pb.WatchEventsRequest(watch_ids=list(watch_ids))
        if after_event_id is not None:
            request.after_event_id = after_event_id
        return self.stub.WatchEvents(request, timeout=timeout_s, metadata=self.metadata)

    # -- keyframes ----------------------------------------------------------------------------------
    def get_keyframes(
        self,
        stream_id: str,
        *,
        keyframe_ids: Iterable[str] = (),
        cluster_id: str = "",
        latest: bool = False,
    ) -> list[pb.Keyframe]:
        """Keyframes (JPEG thumbnails) of one stream: by id (``EvidenceSpan.keyframe_ids``), every keyframe of
        ``cluster_id``, or the stream's newest with ``latest``; give exactly one of the three."""
        request = pb.GetKeyframesRequest(
            stream_id=stream_id, keyframe_ids=list(keyframe_ids), cluster_id=cluster_id, latest=latest
        )
        return list(self.stub.GetKeyframes(request, timeout=self.timeout_s, metadata=self.metadata).keyframes)
