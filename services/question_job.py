"""One question as the engine loop holds it while it answers, a step at a time."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

DONE = object()  # ends a question's event queue


@dataclass(slots=True)
class QuestionJob:
    """One question about one stream, advanced a step at a time by the loop."""

    question_id: str
    stream_id: str
    question: str
    max_new_tokens: int
    time_range: tuple[float, float] | None
    deadline_s: float  # time.monotonic() by which the answer must be done
    retention_s: float = 0.0
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    gen: object = None
    low_priority: bool = False
    on_finish: object = None  # called on the engine thread with (job, error or None) once the job ends
    answering: bool = False  # an event has reached the caller, so the job can no longer start over
    waits_for_room_until: int = -1  # parked until more than this many running questions have finished
    submitted_s: float = 0.0  # time.monotonic() when the loop received it
    started_s: float = 0.0  # time.monotonic() when the engine began it (again, after a wait for device room)
    first_event_s: float = 0.0  # time.monotonic() when the engine thread handed its first event to the caller
