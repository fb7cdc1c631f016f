"""Standing questions, router side: the watches, their events, subscribers and webhooks.

- **Watches** live in a ``WatchStore`` (Redis when the server has ``redis_url``: they survive restarts). Every
  worker gets the full list (``WorkerCore.set_watches``) whenever it changes, at start-up, every 30 s, and
  whenever a worker reports a different number of watches than the router has (it restarted).
- **Events.** One task per worker long-polls ``take_watch_events``; each fired event gets a server-wide id
  and goes into its watch's bounded buffer in the store, then to subscribers and, if the watch has one, its
  webhook. The buffer is where subscribers read from, so a reconnecting client resumes from its last id.
- **A store that lost its data** (a Redis restarted empty): the router writes back the watches it holds, so the
  emptied store does not read as every watch deleted, and event ids go on after the newest it issued
  (``_recover_store``). Their buffered events and cooldowns are gone; a resuming reader is told it missed some.
- **Subscribers** (``WatchEvents``) read the buffer after their cursor and then wait for the next event
  (``WatchSubscribersMixin`` in ``services.watches_subscribers``, mixed into ``WatchRegistry``).
- **Deleted streams.** ``forget_stream`` (after the stream's worker has forgotten it and marked its unreported
  events ``sets_cooldown=False``) clears the stream's cooldowns in the store, and keeps them cleared: an event of
  the stream in a report taken before the forget is still stored, but without its cooldown (the report may
  predate the delete), and a store write of its cooldown already under way is waited for. A worker takes the
  router's cooldowns only for streams it restored (``WorkerWatches.set_watches``), so a sync that read them before
  the forget cannot hand them to a stream created again under the id, which starts without its predecessor's.
- **A question the engine would refuse** (past ``max_question_tokens``, as Ask refuses it) is refused by
  ``create``. The router counts its tokens itself (``WatchQuestionLimit``, with the tokenizer loaded at
  ``start``), so the check needs no worker: it neither waits for one nor fails because none is ready.
  Stored watches from before the check are loaded as they are and named in the log (docs/watches.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from mosaic_core.engine.stream import check_stream_id
from mosaic_core.errors import AlreadyExistsError, CapacityError, NotFoundError
from services.errors import UnavailableError, UnknownWatchError, is_store_outage
from services.metadata.watches import WatchState, WatchStore
from services.metrics import MosaicMetrics
from services.outage_log import StoreOutageLog
from services.watch_questions import WatchQuestionLimit
from services.watches_spec import FiredEvent, WatchRecord, WatchReport, check_watch_id
from services.watches_subscribers import WatchSubscribersMixin
from services.watches_webhook import Delivery, WebhookSender, check_webhook_url

log = logging.getLogger(__name__)
POLL_WAIT_S = 1.0
RESYNC_INTERVAL_S = 30.0
SYNC_TIMEOUT_S = 10.0  # a restarting worker gets the list from its poll loop once it is back
RELOAD_INTERVAL_S = 5.0  # watches created through another router (same Redis) are picked up this often


@dataclass(slots=True, eq=False)
class _Take:
    """One worker report, from the call that takes it until its events are stored: the streams deleted
    meanwhile, whose events in it may belong to the deleted incarnation."""

    deleted_stream_ids: set[str] = dataclasses.field(default_factory=set)


class WatchRegistry(WatchSubscribersMixin):
    """Every watch of one router.

    Args:
        store: where watches and events live.
        coordinator: the router's ``Coordinator`` (workers and stream placement).
        metrics: the router's metrics.
        config: the ``ServiceConfig`` (limits, defaults, webhook settings).
    """

    def __init__(self, store: WatchStore, coordinator, metrics: MosaicMetrics, config) -> None:
        self.store = store
        self.coordinator = coordinator
        self.metrics = metrics.watches
        self.config = config
        self.question_limit = WatchQuestionLimit(config.engine_config().max_question_tokens)
        self._records: dict[str, WatchRecord] = {}
        self._version = 0  # bumped by every create and delete here, so a reload never applies a stale read
        self._new_event = asyncio.Condition()
        self._changes = 0  # bumped with each wake of the subscribers: one that read before a bump reads again
        self._closed = False
        self._num_subscribers = 0
        self._creating: set[str] = set()  # watches whose store write is in flight (count toward max_watches)
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self._sync_lock = asyncio.Lock()
        self._takes: set[_Take] = set()  # reports being taken or stored
        self._cooldown_writes: dict[str, set[asyncio.Future]] = {}  # stream -> store writes of its cooldown
        self._epoch = ""  # the store's epoch token when last read (``WatchStore.claim_epoch``)
        self._last_event_id = 0  # the newest event id this router issued or found in the store
        self._recover_lock = asyncio.Lock()
        self.webhooks = WebhookSender(
            config.webhook_allowed_urls,
            self.metrics.webhook,
            timeout_s=config.webhook_timeout_s,
            max_attempts=config.webhook_max_attempts,
            queue_size=config.webhook_queue_size,
        )

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Loads the watches, hands them to every worker and starts polling the workers for events."""
        self._epoch = await asyncio.to_thread(self.store.claim_epoch, uuid.uuid4().hex)
        records = await asyncio.to_thread(self.store.list_watches)
        self._records = {r.watch_id: r for r in records}
        await asyncio.to_thread(self.question_limit.load_and_name, records)
        self._last_event_id = await asyncio.to_thread(self.store.last_event_id)
        self.metrics.set_watches(len(self._records))
        await self.sync_workers()
        self.webhooks.start()
        self._tasks = [asyncio.create_task(self._poll(i)) for i in range(len(self.coordinator.workers))]
        self._tasks.append(asyncio.create_task(self._reload_loop()))

    async def stop_polls(self) -> None:
        """Lets each worker poll finish the call it has out (events it took are stored, not lost), then stops."""
        self._stopping = True
        polls, reload = self._tasks[:-1], self._tasks[-1:]
        for task in reload:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*polls, return_exceptions=True), POLL_WAIT_S + SYNC_TIMEOUT_S)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def drain(self, index: int) -> None:
        """Stores what a stopped worker still holds (events whose answers the shutdown cut short)."""
        worker = self.coordinator.workers[index]
        with self._taking() as take:
            try:
                call = self.coordinator._call(index, worker.take_watch_events.remote(0.0))
                report = await asyncio.wait_for(call, 5.0)
            except Exception as err:
                log.warning("could not take worker %d's last watch events: %s", index, err)
                return
            await self._absorb(report, take)

    async def close(self) -> None:
        """Ends subscribers and webhook delivery (deliveries still queued are not sent; they count as dropped)."""
        await self.end_subscribers()
        await self.webhooks.stop()

    async def sync_workers(self, indices: list[int] | None = None) -> None:
        """Sends the full watch list, with each watch's cooldown state, to the workers."""
        async with self._sync_lock:
            records = list(self._records.items())  # a watch created while the states load goes in the next sync
            states = await asyncio.gather(*(asyncio.to_thread(self.store.state, w) for w, _ in records))
            specs = [r.for_worker(s.fired_until_s) for (_, r), s in zip(records, states, strict=True)]
            targets = range(len(self.coordinator.workers)) if indices is None else indices
            calls = [
                asyncio.wait_for(self.coordinator._call(i, self.coordinator.workers[i].set_watches.remote(specs)),
                                 SYNC_TIMEOUT_S)
                for i in targets
            ]  # fmt: skip
            for index, result in zip(targets, await asyncio.gather(*calls, return_exceptions=True), strict=True):
                if isinstance(result, BaseException):
                    log.warning("worker %d did not take the watch list (%s); it gets it when it is back", index, result)

    # -- CRUD -----------------------------------------------------------------------------------------
    async def create(self, record: WatchRecord) -> tuple[WatchRecord, WatchState]:
        """Checks and stores a new watch (``record`` is built by the servicer from the request)."""
        if not self.coordinator.started:
            raise UnavailableError("the server is starting; retry CreateWatch in a few seconds")
        for stream_id in record.stream_ids:
            check_stream_id(stream_id)
            if stream_id not in self.coordinator.placement:
                raise NotFoundError(f"unknown stream {stream_id!r}; create it first or leave stream_ids empty")
        if record.webhook_url is not None:
            check_webhook_url(record.webhook_url, self.config.webhook_allowed_urls)
        await asyncio.to_thread(self.question_limit.check, record.question)
        if record.watch_id in self._records or record.watch_id in self._creating:
            raise AlreadyExistsError(f"watch {record.watch_id!r} already exists")
        num_watches = len(self._records) + len(self._creating)
        if num_watches >= self.config.max_watches:
            raise CapacityError(
                f"the server already has {num_watches} watches, its limit (max_watches); delete some first"
            )
        self._creating.add(record.watch_id)  # reserved before the await, so concurrent creates count it
        try:
            if not await asyncio.to_thread(self.store.put_watch, record):
                raise AlreadyExistsError(f"watch {record.watch_id!r} already exists")
        finally:
            self._creating.discard(record.watch_id)
        self._records[record.watch_id] = record
        self._version += 1
        self.metrics.set_watches(len(self._records))
        await self._push_to_workers("created", record.watch_id)
        return record, WatchState()

    def records(self) -> list[WatchRecord]:
        """The watches this router holds now (those created through another router come with the next reload)."""
        return list(self._records.values())

    async def list(self) -> list[tuple[WatchRecord, WatchState]]:
        records = await asyncio.to_thread(self.store.list_watches)
        states = await asyncio.gather(*(asyncio.to_thread(self.store.state, r.watch_id) for r in records))
        return list(zip(records, states, strict=True))

    async def forget_stream(self, stream_id: str) -> None:
        """A deleted stream's cooldowns go (``WatchStore.forget_stream``) and stay gone (module doc); a failure is
        logged: the stream is gone. Called once the stream's worker has forgotten it. The forget goes on to the end
        even if the caller is cancelled (DeleteStream's client gone), since the stream's placement is gone already."""
        for take in self._takes:
            take.deleted_stream_ids.add(stream_id)
        await asyncio.shield(self._forget_cooldowns(stream_id))

    async def _forget_cooldowns(self, stream_id: str) -> None:
        writes = self._cooldown_writes.get(stream_id)
        if writes:
            await asyncio.wait(set(writes))
        try:
            await asyncio.to_thread(self.store.forget_stream, stream_id)
        except Exception:
            log.exception("stream %r was deleted, but its watch cooldowns could not be dropped", stream_id)

    async def delete(self, watch_id: str) -> None:
        check_watch_id(watch_id)
        if not await asyncio.to_thread(self.store.delete_watch, watch_id):
            raise UnknownWatchError(f"unknown watch {watch_id!r}; ListWatches shows the ones that exist")
        self._records.pop(watch_id, None)
        self._version += 1
        self.metrics.set_watches(len(self._records))
        await self._push_to_workers("deleted", watch_id)
        await self._wake_subscribers()  # subscribers of the deleted watch end

    async def _push_to_workers(self, change: str, watch_id: str) -> None:
        """After a change is committed to the store: a failure to hand workers the list is logged, not raised,
        since the change happened; the workers get the list on their next poll's resync."""
        try:
            await self.sync_workers()
        except Exception:
            log.exception("watch %r was %s, but handing the workers the new list failed", watch_id, change)

    async def _reload_loop(self) -> None:
        """Follows the store: another router sharing it (or an operator) may have added or removed watches."""
        outage = StoreOutageLog(log, "reloading watches from the store")
        while True:
            await asyncio.sleep(RELOAD_INTERVAL_S)
            try:
                await self._reload()
            except Exception as err:  # keep what we have and try again
                if is_store_outage(err):  # down or frozen
                    outage.failed(err)
                else:  # a bug
                    log.exception("reloading watches from the store failed (retrying every %.0f s)", RELOAD_INTERVAL_S)
                continue
            outage.worked()

    async def _reload(self) -> None:
        version = self._version
        records = {r.watch_id: r for r in await asyncio.to_thread(self.store.list_watches)}
        if await self._recover_store():  # read from a store that lost its data: the list is not the watches
            return
        if version == self._version and records != self._records:  # added, removed, or replaced under its id
            seen, self._records = self._records, records
            # Only those new here: the loop comes every few seconds, and each over-long watch is named once.
            new_here = [r for i, r in records.items() if seen.get(i) != r]
            await asyncio.to_thread(self.question_limit.name_past_the_limit, new_here)
            self.metrics.set_watches(len(records))
            await self.sync_workers()
            await self._wake_subscribers()

    async def _recover_store(self) -> bool:
        """True if the store lost its data since the router last looked (its epoch changed: a Redis restarted
        without it), after writing back the watches this router holds and raising the event counter past the
        newest id it issued."""
        async with self._recover_lock:
            epoch = await asyncio.to_thread(self.store.claim_epoch, uuid.uuid4().hex)
            if epoch == self._epoch or not self._epoch:  # unchanged, or the first look (``start`` takes it)
                self._epoch = epoch
                return False
            records = list(self._records.values())
            restored = await asyncio.to_thread(self.store.restore, records, self._last_event_id)
            self._epoch = epoch
        log.error(
            "the watch store lost its data (a Redis restarted without it?): %d of this router's %d watches were "
            "written back (%s); event ids go on after %d; their buffered events and cooldowns are gone. Keep "
            "Redis persistent (docs/watches.md)",
            len(restored), len(records), ", ".join(restored) or "none missing", self._last_event_id,
        )  # fmt: skip
        return True

    # -- events ---------------------------------------------------------------------------------------
    async def _poll(self, index: int) -> None:
        last_sync = time.monotonic()
        failures = 0  # polls failed in a row: the first is a warning, the rest debug lines
        outage = StoreOutageLog(log, f"re-sending worker {index}'s watch list")  # retried at each poll until it works
        while not self._stopping:
            worker = self.coordinator.workers[index]
            with self._taking() as take:
                try:
                    report = await self.coordinator._call(index, worker.take_watch_events.remote(POLL_WAIT_S))
                except asyncio.CancelledError:
                    raise
                except Exception as err:  # a restarting worker: try again shortly, then re-send the watches
                    failures += 1
                    level = logging.WARNING if failures == 1 else logging.DEBUG
                    log.log(level, "watch poll of worker %d failed (retrying every %.0f s): %s", index, POLL_WAIT_S,
                            err)  # fmt: skip
                    await asyncio.sleep(POLL_WAIT_S)
                    last_sync = 0.0
                    continue
                failures = 0
                try:
                    await self._absorb(report, take)
                    if report.num_watches != len(self._records) or time.monotonic() - last_sync > RESYNC_INTERVAL_S:
                        await self.sync_workers([index])
                        last_sync = time.monotonic()
                    outage.worked()
                except Exception as err:  # must not end the poll: every later event of the worker would be lost
                    if is_store_outage(err):  # the sync's read of the cooldowns
                        outage.failed(err)
                    else:  # a bug
                        log.exception("handling worker %d's watch events failed", index)

    @contextlib.contextmanager
    def _taking(self) -> Iterator[_Take]:
        """Registers a worker report from before it is taken until its events are stored: a stream deleted
        meanwhile is marked in it."""
        take = _Take()
        self._takes.add(take)
        try:
            yield take
        finally:
            self._takes.discard(take)

    async def _absorb(self, report: WatchReport, take: _Take | None = None) -> None:
        self.metrics.evaluated(report.num_evaluations)
        for reason, n in report.suppressed.items():
            self.metrics.suppressed(reason, n)
        for reason, n in report.dropped.items():
            self.metrics.dropped(reason, n)
        for seconds in report.score_seconds:
            self.metrics.observe_score(seconds)
        for event in report.events:
            await self._record(event, take)

    async def _record(self, event: FiredEvent, take: _Take | None = None) -> None:
        """Stores, publishes and forwards one event of the report ``take``."""
        record = self._records.get(event.watch_id)
        if record is None or record.created_s != event.watch_created_s:
            return  # deleted since the worker fired it (and maybe created again under its id: not this one's event)
        payload = dataclasses.asdict(event) | {"question": record.question, "labels": dict(record.labels)}
        del payload["sets_cooldown"], payload["watch_created_s"]
        sets_cooldown = event.sets_cooldown and (take is None or event.stream_id not in take.deleted_stream_ids)
        try:
            stored = await self._append(event, payload, sets_cooldown)
            if stored is None and event.watch_id in self._records and await self._recover_store():
                stored = await self._append(event, payload, sets_cooldown)  # the watch was lost with the store's data
        except Exception as err:  # the worker handed the event over: unconfirmed, it goes no further, counted so
            log.warning("watch %r's event on %s was not stored (or not confirmed) and is not sent on: %s",
                        event.watch_id, event.cluster_id, err)  # fmt: skip
            self.metrics.dropped("store_failed")
            return
        if stored is None:
            return
        event_id, trimmed = stored
        self._last_event_id = max(self._last_event_id, event_id)
        if trimmed:  # counted whether or not someone follows: a follower may not have read them yet either
            self.metrics.dropped("buffer_full", trimmed)
        self.metrics.fired(time.time() - event.sealed_unix_s)
        if record.webhook_url:
            body = payload | {"event_id": event_id}
            self.webhooks.enqueue(Delivery(record.webhook_url, record.webhook_secret, event_id, body))
        await self._wake_subscribers()

    async def _append(self, event: FiredEvent, payload: dict, sets_cooldown: bool) -> tuple[int, int] | None:
        """The store's ``append_event``; a forget of the event's stream waits for a write that sets its cooldown."""
        write = asyncio.ensure_future(
            asyncio.to_thread(
                self.store.append_event,
                event.watch_id,
                payload,
                max_events=self.config.watch_event_buffer,
                sets_cooldown=sets_cooldown,
            )
        )
        if sets_cooldown:  # a forget of the stream from now on waits for it
            writes = self._cooldown_writes.setdefault(event.stream_id, set())
            writes.add(write)
            write.add_done_callback(lambda done, s=event.stream_id: self._cooldown_write_done(s, done))
        return await asyncio.shield(write)  # cancelled or not, the write completes and is waited for

    def _cooldown_write_done(self, stream_id: str, write: asyncio.Future) -> None:
        writes = self._cooldown_writes.get(stream_id)
        if writes is not None:
            writes.discard(write)
            if not writes:
                del self._cooldown_writes[stream_id]


def new_watch_id() -> str:
    return f"w-{uuid.uuid4().hex[:12]}"
