"""The router's bounded question queue: priority classes, round-robin fairness across streams, deadlines.

At most ``max_running`` questions run at once (each costs worker forward passes that would otherwise go to
ingest, so this cap is also what keeps cameras real-time), and at most ``max_waiting`` wait. A question
that finds the queue full is refused at once with ``QueueFullError`` (RESOURCE_EXHAUSTED) and a retry
hint: the expected wait, from the average run time of recent questions.

When a slot frees, the highest priority class with waiters goes first; within a class, the fairness keys
(the streams a question targets) take turns, so one client hammering one camera cannot starve questions
about the others:

    priority HIGH:   (empty)
    priority NORMAL: key cam-1 -> [q1, q4, q5]   <- next turn: q1, then q2 (cam-2), then q4, ...
                     key cam-2 -> [q2]
    priority LOW:    key *     -> [q3]           <- only when NORMAL is empty
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from services.errors import DeadlineError, QueueFullError

_EWMA_WEIGHT = 0.2
_MIN_RETRY_AFTER_S = 0.1


@dataclass(slots=True, eq=False)
class Ticket:
    """One question's place in the queue."""

    key: str
    priority: int
    enqueued_s: float
    granted: asyncio.Future = field(default=None)  # type: ignore[assignment]
    started_s: float | None = None


class QueryQueue:
    """Admission and ordering of questions (one asyncio event loop).

    Args:
        max_waiting: questions that may wait; more are refused.
        max_running: questions that may run at once.
        on_depth: called with the number waiting after every change (the queue-depth gauge).
        on_running: called with the number running after every change (the running gauge).
    """

    def __init__(self, *, max_waiting: int, max_running: int, on_depth=None, on_running=None) -> None:
        if max_waiting < 1 or max_running < 1:
            raise ValueError(f"max_waiting={max_waiting} and max_running={max_running} must be >= 1")
        self.max_waiting = max_waiting
        self.max_running = max_running
        self._on_depth = on_depth or (lambda n: None)
        self._on_running = on_running or (lambda n: None)
        self._classes: dict[int, OrderedDict[str, deque[Ticket]]] = {}
        self._num_waiting = 0
        self._running: set[Ticket] = set()
        self._avg_run_s = 1.0

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return len(self._running)

    def retry_after_s(self) -> float:
        """Expected time until a slot frees for a newcomer: the queue ahead of it, at the recent run time."""
        rounds = (self._num_waiting + 1) / self.max_running
        return max(_MIN_RETRY_AFTER_S, rounds * self._avg_run_s)

    def admit(self, key: str, priority: int) -> Ticket:
        """Enters a question, or raises ``QueueFullError`` when ``max_waiting`` are already waiting."""
        loop = asyncio.get_running_loop()
        ticket = Ticket(key=key, priority=priority, enqueued_s=time.monotonic(), granted=loop.create_future())
        if len(self._running) < self.max_running and self._num_waiting == 0:
            self._grant(ticket)
            return ticket
        if self._num_waiting >= self.max_waiting:
            wait_s = self.retry_after_s()
            raise QueueFullError(
                f"the question queue is full ({self._num_waiting} waiting, {len(self._running)} running); "
                f"retry in about {wait_s * 1000:.0f} ms",
                retry_after_s=wait_s,
            )
        self._classes.setdefault(priority, OrderedDict()).setdefault(key, deque()).append(ticket)
        self._num_waiting += 1
        self._on_depth(self._num_waiting)
        return ticket

    async def wait_turn(self, ticket: Ticket, timeout_s: float | None) -> float:
        """Waits until the ticket may run; returns the seconds it waited.

        Raises:
            DeadlineError: ``timeout_s`` passed first (the ticket leaves the queue).
        """
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(ticket.granted)
        except TimeoutError:
            if not ticket.granted.done():
                self._withdraw(ticket)
                raise DeadlineError(
                    f"the deadline passed after {time.monotonic() - ticket.enqueued_s:.2f}s in the question queue"
                ) from None
        except asyncio.CancelledError:
            if not ticket.granted.done():
                self._withdraw(ticket)
            else:
                self.release(ticket)
            raise
        return ticket.started_s - ticket.enqueued_s

    def release(self, ticket: Ticket) -> None:
        """Frees the ticket's slot (idempotent) and grants the next waiter."""
        if ticket not in self._running:
            return
        self._running.discard(ticket)
        run_s = time.monotonic() - (ticket.started_s or ticket.enqueued_s)
        self._avg_run_s += _EWMA_WEIGHT * (run_s - self._avg_run_s)
        self._grant_next()
        self._on_running(len(self._running))

    def _grant(self, ticket: Ticket) -> None:
        ticket.started_s = time.monotonic()
        self._running.add(ticket)
        self._on_running(len(self._running))
        if not ticket.granted.done():
            ticket.granted.set_result(None)

    def _grant_next(self) -> None:
        while len(self._running) < self.max_running and self._num_waiting:
            priority = max(p for p, keys in self._classes.items() if keys)
            keys = self._classes[priority]
            key, tickets = next(iter(keys.items()))
            ticket = tickets.popleft()
            del keys[key]
            if tickets:
                keys[key] = tickets  # back of the line: the other keys go first
            self._num_waiting -= 1
            self._grant(ticket)
        self._on_depth(self._num_waiting)

    def _withdraw(self, ticket: Ticket) -> None:
        keys = self._classes.get(ticket.priority, OrderedDict())
        tickets = keys.get(ticket.key)
        if tickets is not None and ticket in tickets:
            tickets.remove(ticket)
            if not tickets:
                del keys[ticket.key]
            self._num_waiting -= 1
            self._on_depth(self._num_waiting)
