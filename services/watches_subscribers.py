"""Standing questions, subscriber side (``WatchSubscribersMixin``, mixed into ``WatchRegistry``): WatchEvents
calls read their watches' event buffers after their cursor, then wait for the next event.

A subscriber that resumes after events were trimmed unread is told it missed some (``WatchEventItem.missed_before``).
The registry wakes the subscribers when it stores an event, deletes a watch or reloads changed watches; each also
re-reads at least every ``SUBSCRIBER_WAKE_S`` (events stored by other routers sharing the store).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from mosaic_core.errors import CapacityError, InvalidArgumentError
from services.errors import UnknownWatchError
from services.watches_spec import check_watch_id

SUBSCRIBER_WAKE_S = 5.0  # a subscriber re-reads the buffer at least this often (events of other routers)
READ_BATCH = 256


@dataclass(slots=True)
class WatchEventItem:
    """One event as a subscriber receives it."""

    event_id: int
    payload: dict
    missed_before: bool = False


class WatchSubscribersMixin:
    """``WatchRegistry``'s WatchEvents subscribers, mixed into it: uses the registry's ``store``, ``metrics``,
    ``config``, ``_records``, ``_closed``, ``_new_event``, ``_changes`` and ``_num_subscribers``."""

    async def end_subscribers(self) -> None:
        """Ends every WatchEvents call now (a shutdown; a client resumes after its last event id elsewhere)."""
        self._closed = True
        await self._wake_subscribers()

    async def _wake_subscribers(self) -> None:
        async with self._new_event:
            self._changes += 1
            self._new_event.notify_all()

    async def subscribe(self, watch_ids: list[str], after_event_id: int | None) -> AsyncIterator[WatchEventItem]:
        """Events of ``watch_ids`` (empty: all) after ``after_event_id`` (None: from now on), then live; ends
        when a named watch is deleted."""
        for watch_id in watch_ids:
            check_watch_id(watch_id)
            if watch_id not in self._records:
                raise UnknownWatchError(f"unknown watch {watch_id!r}; ListWatches shows the ones that exist")
        if after_event_id is not None and after_event_id < 0:
            raise InvalidArgumentError(f"after_event_id must be >= 0, got {after_event_id}")
        if self._num_subscribers >= self.config.max_watch_subscribers:
            raise CapacityError(
                f"the server already has {self._num_subscribers} WatchEvents subscribers, its limit; "
                "follow several watches in one call"
            )
        self._follow(+1)  # reserved before the first await, so concurrent subscribers count it
        gaps: set[str] = set()  # watches with events trimmed unread whose next event has not gone out yet
        try:
            if after_event_id is not None:
                cursor = after_event_id
            else:
                cursor = await asyncio.to_thread(self.store.last_event_id)
            while not self._closed:
                if watch_ids and any(w not in self._records for w in watch_ids):
                    return
                seen = self._changes  # an event stored while this reads, or while its items go out, is read next
                items = await self._read(watch_ids or list(self._records), cursor, gaps)
                for item in items:
                    cursor = item.event_id
                    yield item
                if len(items) < READ_BATCH:
                    async with self._new_event:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(
                                self._new_event.wait_for(lambda seen=seen: self._changes != seen), SUBSCRIBER_WAKE_S
                            )
        finally:
            self._follow(-1)

    def _follow(self, step: int) -> None:
        self._num_subscribers += step
        self.metrics.set_subscribers(self._num_subscribers)

    async def _read(self, watch_ids: list[str], cursor: int, gaps: set[str]) -> list[WatchEventItem]:
        """The next events after ``cursor``, oldest first, at most ``READ_BATCH``; the first of a watch's events
        after some were trimmed unread says so. A watch whose first event after such a gap does not make this batch
        stays in ``gaps`` for the next: the cursor passes its trimmed ones here.

        Ids are global and the watches are read one after another, so an event stored in a watch already read
        may get a smaller id than one read from a later watch: returned, that later one would move the cursor past
        it for good. Only ids up to the newest issued before the reads are returned. Both stores issue an id and
        store its event in one step (a lock; one Lua script), so none of those can still be missing."""

        def read() -> list[WatchEventItem]:
            ceiling = self.store.last_event_id()
            items = []  # (item, its watch)
            for watch_id in watch_ids:
                events = [(i, e) for i, e in self.store.events_after(watch_id, cursor, READ_BATCH) if i <= ceiling]
                if not events:  # none newer: none were trimmed since the cursor either
                    continue
                if self.store.state(watch_id).trimmed_through > cursor:
                    gaps.add(watch_id)
                items += [(WatchEventItem(i, e), watch_id) for i, e in events]
            items.sort(key=lambda pair: pair[0].event_id)
            batch = items[:READ_BATCH]
            for item, watch_id in batch:
                if watch_id in gaps:
                    item.missed_before = True
                    gaps.discard(watch_id)
            return [item for item, _ in batch]

        return await asyncio.to_thread(read)
