"""Watch messages to and from the core records (``services.watches_spec``)."""

from __future__ import annotations

import time

from mosaic_core.config import MIB
from mosaic_core.errors import CapacityError, InvalidArgumentError
from services.gen.mosaic.v1 import mosaic_pb2 as pb
from services.labels import check_labels
from services.metadata.watches import WatchState
from services.watches import new_watch_id
from services.watches_spec import ActiveHours, WatchRecord
from services.watches_subscribers import WatchEventItem
from services.watches_webhook import redact

# A watch's webhook is kept in the metadata store and in the router for as long as the watch lives: bounded at
# CreateWatch as a stream's source_url is. A signing secret is a key of a few dozen bytes.
MAX_WEBHOOK_URL_CHARS = 2048
MAX_WEBHOOK_SECRET_CHARS = 256


# A watch's state as ListWatches sends it at its widest (both counters set), for its entry's size in the reply
_WIDEST_STATE = WatchState(num_events=2**63 - 1, last_event_unix_s=1.0)


def listed_bytes(record: WatchRecord) -> int:
    """The bytes ``record`` takes in a ListWatches reply (its counters at their widest)."""
    return pb.ListWatchesResponse(watches=[watch_to_proto(record, _WIDEST_STATE)]).ByteSize()


def check_listing_room(records: list[WatchRecord], record: WatchRecord, max_bytes: int | None) -> None:
    """Refuses a new watch that would take ListWatches' one reply past ``max_bytes`` (the server's message limit):
    gRPC would fail every ListWatches then, with no sentence, until watches were deleted. Each watch's labels,
    question and stream ids are bounded, but not those of ``max_watches`` watches together.

    Raises:
        CapacityError: the reply would not fit, with its size.
    """
    if max_bytes is None:
        return
    size = listed_bytes(record) + sum(listed_bytes(r) for r in records if r.watch_id != record.watch_id)
    if size > max_bytes:
        raise CapacityError(
            f"watch {record.watch_id!r} would take the ListWatches reply to {size / MIB:.2f} MiB, past the server's "
            f"message limit of {max_bytes / MIB:.2f} MiB (max_message_bytes); delete watches, or give this one fewer "
            "or shorter labels and stream ids"
        )


def record_from_request(request: pb.CreateWatchRequest, *, default_threshold: float, default_cooldown_s: float):
    """A validated ``WatchRecord`` (``InvalidArgumentError`` with a sentence otherwise)."""
    hours = None
    if request.HasField("active_hours"):
        h = request.active_hours
        hours = ActiveHours(h.start, h.end, h.timezone or "UTC")
    webhook_url = webhook_secret = None
    if request.HasField("webhook") and (request.webhook.url or request.webhook.secret):
        webhook_url, webhook_secret = request.webhook.url, request.webhook.secret
        for what, value, limit in (
            ("URL", webhook_url, MAX_WEBHOOK_URL_CHARS),
            ("secret", webhook_secret, MAX_WEBHOOK_SECRET_CHARS),
        ):
            if len(value) > limit:
                raise InvalidArgumentError(f"the webhook {what} is {len(value)} characters long; the limit is {limit}")
    check_labels(dict(request.labels), "a watch")
    return WatchRecord(
        watch_id=request.watch_id or new_watch_id(),
        question=request.question,
        stream_ids=list(dict.fromkeys(request.stream_ids)),
        threshold=request.threshold if request.HasField("threshold") else default_threshold,
        cooldown_s=request.cooldown_s if request.HasField("cooldown_s") else default_cooldown_s,
        active_hours=hours,
        labels=dict(request.labels),
        **({"max_answer_tokens": request.max_answer_tokens} if request.max_answer_tokens else {}),  # 0: default
        webhook_url=webhook_url,
        webhook_secret=webhook_secret or "",
        created_s=time.time(),
    )


def watch_to_proto(record: WatchRecord, state: WatchState) -> pb.Watch:
    watch = pb.Watch(
        watch_id=record.watch_id,
        question=record.question,
        stream_ids=record.stream_ids,
        threshold=record.threshold,
        cooldown_s=record.cooldown_s,
        labels=record.labels,
        webhook_url=redact(record.webhook_url) if record.webhook_url else "",  # the path may hold a secret
        max_answer_tokens=record.max_answer_tokens,
        created_s=record.created_s,
        num_events=state.num_events,
        last_event_unix_s=state.last_event_unix_s,
    )
    if record.active_hours is not None:
        hours = record.active_hours
        watch.active_hours.CopyFrom(pb.ActiveHours(start=hours.start, end=hours.end, timezone=hours.timezone))
    return watch


def event_to_proto(item: WatchEventItem) -> pb.WatchEvent:
    p = item.payload
    return pb.WatchEvent(
        event_id=item.event_id,
        watch_id=p["watch_id"],
        stream_id=p["stream_id"],
        cluster_id=p["cluster_id"],
        start_s=p["start_s"],
        end_s=p["end_s"],
        score=p["score"],
        answer=p["answer"],
        answer_error=p["answer_error"],
        question=p.get("question", ""),
        labels=p.get("labels", {}),
        sealed_unix_s=p["sealed_unix_s"],
        fired_unix_s=p["fired_unix_s"],
        missed_before=item.missed_before,
    )
