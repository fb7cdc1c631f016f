"""Standing questions ("watches"): the records the router keeps and the workers evaluate, and their checks.

Plain dataclasses, shared by the router (``services.watches``), the metadata store (``services.metadata``) and
the workers (``services.watches_worker``); they pickle across Ray. Every user-facing check raises
``InvalidArgumentError`` with a sentence that names the offending value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mosaic_core.errors import InvalidArgumentError, shown
from services.labels import check_label_shape

WATCH_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_QUESTION_CHARS = 1000
# IANA names are at most about 40 characters ("posix/America/Argentina/ComodRivadavia"); a longer one is refused
# before zoneinfo reads it, which imports a package per '/' and overflows the stack on a few hundred of them.
MAX_TIMEZONE_CHARS = 64
_HHMM = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)")


def check_watch_id(watch_id: str) -> str:
    if not isinstance(watch_id, str) or not WATCH_ID_RE.fullmatch(watch_id):
        raise InvalidArgumentError(
            f"watch id {shown(watch_id)} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return watch_id


@dataclass(frozen=True, slots=True)
class ActiveHours:
    """Time of day during which a watch may fire: ``[start, end)`` in ``timezone``; wraps past midnight when
    ``end`` is not after ``start`` (``22:00``-``06:00`` is the night). Judged on a cluster's start time read as
    Unix seconds, which is what live and pushed cameras' clocks are. A time before the year 1, which a pushed
    camera's clock may send (``MAX_TIMESTAMP_S``) but the calendar cannot hold, is outside the hours."""

    start: str
    end: str
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            if not _HHMM.fullmatch(getattr(self, name)):
                value = shown(getattr(self, name))
                raise InvalidArgumentError(f"active hours {name} {value} is not HH:MM (00:00-23:59)")
        if _minutes(self.start) == _minutes(self.end):  # compared as times: "8:00" is "08:00"
            raise InvalidArgumentError(f"active hours start and end are both {self.end}; leave them unset for all day")
        unknown = InvalidArgumentError(
            f"timezone {shown(self.timezone)} is not a known IANA time zone name (such as 'UTC' or 'Europe/Berlin')"
        )
        if len(self.timezone) > MAX_TIMEZONE_CHARS:
            raise unknown
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise unknown from None

    def contains(self, unix_s: float) -> bool:
        try:
            local = datetime.fromtimestamp(unix_s, UTC).astimezone(ZoneInfo(self.timezone))
        except (ValueError, OverflowError, OSError):
            return False
        minute = local.hour * 60 + local.minute
        start, end = _minutes(self.start), _minutes(self.end)
        return start <= minute < end if start < end else minute >= start or minute < end


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


@dataclass(slots=True, kw_only=True)
class WatchRecord:
    """A standing question as stored.

    Attributes:
        watch_id: unique id.
        question: what to ask about each sealed cluster that scores above ``threshold``.
        stream_ids: streams it watches; empty watches every stream, including ones created later.
        threshold: lift in nats (``mosaic_core.engine.watching``) a cluster must reach.
        cooldown_s: after an event on a stream, clusters of that stream starting within this many seconds
            (stream clock) of the event's end do not fire.
        active_hours: time of day it may fire; None is all day.
        labels: free-form, returned with the watch and every event.
        max_answer_tokens: tokens of the short answer in each event.
        webhook_url: where events are also POSTed; None for none.
        webhook_secret: HMAC-SHA256 key of the webhook's signature header (never returned by the API).
        created_s: wall-clock creation time.
    """

    watch_id: str
    question: str
    stream_ids: list[str] = field(default_factory=list)
    threshold: float = 0.0
    cooldown_s: float = 60.0
    active_hours: ActiveHours | None = None
    labels: dict[str, str] = field(default_factory=dict)
    max_answer_tokens: int = 16
    webhook_url: str | None = None
    webhook_secret: str = ""
    created_s: float = 0.0

    def __post_init__(self) -> None:
        check_watch_id(self.watch_id)
        if not isinstance(self.question, str) or not self.question.strip():
            raise InvalidArgumentError("the question is empty; say what the watch should look for")
        if len(self.question) > MAX_QUESTION_CHARS:
            raise InvalidArgumentError(
                f"the question is {len(self.question)} characters long; the limit is {MAX_QUESTION_CHARS}"
            )
        if not math.isfinite(self.threshold):
            raise InvalidArgumentError(f"threshold must be a finite number of nats, got {self.threshold!r}")
        if not (math.isfinite(self.cooldown_s) and self.cooldown_s >= 0):
            raise InvalidArgumentError(f"cooldown_s must be >= 0 seconds, got {self.cooldown_s!r}")
        if not 1 <= self.max_answer_tokens <= 256:
            raise InvalidArgumentError(f"max_answer_tokens must be in 1..256, got {self.max_answer_tokens}")
        check_label_shape(self.labels, "a watch")  # a stored watch is read back through here: created by older rules

    def applies_to(self, stream_id: str) -> bool:
        return not self.stream_ids or stream_id in self.stream_ids

    def for_worker(self, fired_until_s: dict[str, float]) -> WatchSpec:
        """What a worker needs to evaluate the watch (no webhook, no secret)."""
        return WatchSpec(
            watch_id=self.watch_id,
            question=self.question,
            stream_ids=tuple(self.stream_ids),
            threshold=self.threshold,
            cooldown_s=self.cooldown_s,
            active_hours=self.active_hours,
            max_answer_tokens=self.max_answer_tokens,
            fired_until_s=dict(fired_until_s),
            created_s=self.created_s,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchSpec:
    """A watch as a worker evaluates it; ``fired_until_s`` is the end (stream clock) of each stream's last
    event, so a restarted worker keeps the cooldown. ``created_s`` tells a watch from one deleted before it under
    the same id (watches have no update: a change is a delete and a create)."""

    watch_id: str
    question: str
    stream_ids: tuple[str, ...]
    threshold: float
    cooldown_s: float
    active_hours: ActiveHours | None
    max_answer_tokens: int
    fired_until_s: dict[str, float]
    created_s: float = 0.0

    def applies_to(self, stream_id: str) -> bool:
        return not self.stream_ids or stream_id in self.stream_ids


@dataclass(slots=True, kw_only=True)
class FiredEvent:
    """A watch that fired on a sealed cluster, as a worker reports it (the router numbers and stores it)."""

    watch_id: str
    stream_id: str
    cluster_id: str
    start_s: float
    end_s: float
    score: float
    answer: str
    answer_error: str
    sealed_unix_s: float
    fired_unix_s: float
    # False for an event of a stream deleted since it fired: it is stored and delivered, but its cooldown would
    # outlive the stream and hold back a stream created again under the id
    sets_cooldown: bool = True
    # The ``created_s`` of the watch that fired: the router drops the event if the watch was deleted and created
    # again under its id before the event came (an answer finishing late), since it answers the old question
    watch_created_s: float = 0.0


@dataclass(slots=True)
class WatchReport:
    """What a worker hands the router on each poll: events, and counts since the previous poll."""

    events: list[FiredEvent] = field(default_factory=list)
    num_evaluations: int = 0
    suppressed: dict[str, int] = field(default_factory=dict)  # reason -> count
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    score_seconds: list[float] = field(default_factory=list)  # engine time to score one sealed cluster
    num_watches: int = 0  # watches the worker holds (fewer than the router's: it restarted)
