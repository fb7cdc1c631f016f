"""``IdleWatch``: ends a streaming call's wait for its client's next message once that wait lasted too long.

A single timer handle per call, moved on only when it fires. ``asyncio.timeout`` around every read makes and cancels
a timer per message, and cancelled timers stay in the event loop until it next runs its timers: 36,000 frames read
without the loop getting a turn (``tests/integration/test_push_rejections.py``) kept 7 MiB that way.
"""

from __future__ import annotations

import asyncio
import contextlib


class IdleWatch:
    """Cancels the current task when one ``waiting`` block has lasted ``idle_s``; ``fired`` then says so.

    Use as a context manager around the call (it stops the timer), and ``waiting()`` around each read.
    """

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.fired = False
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._waiting_since: float | None = None
        self._handle: asyncio.TimerHandle | None = None

    def __enter__(self) -> IdleWatch:
        self._handle = self._loop.call_at(self._loop.time() + self.idle_s, self._check)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.cancel()

    @contextlib.contextmanager
    def waiting(self):
        self._waiting_since = self._loop.time()
        try:
            yield
        finally:
            self._waiting_since = None

    def _check(self) -> None:
        now = self._loop.time()
        due = now + self.idle_s if self._waiting_since is None else self._waiting_since + self.idle_s
        if now < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self.fired = True
        self._task.cancel()
