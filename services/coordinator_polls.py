"""The router's telemetry poll of its workers (``TelemetryPollsMixin``, mixed into ``Coordinator``): drains their
counters into the router's metrics and tracks which workers answer, which are stalled, and which came back.

**A worker that stops answering** loses its own gauges (``MosaicMetrics.forget_worker``): they would read as its
last healthy values. Its streams' lag goes on growing from the last value it reported, since they ingest nothing,
and their queue depth reads 0, as its queues went with it.

**A worker marked down** (it missed polls for ``DOWN_AFTER_S``, two in a row at the least: frozen, hung or restarting;
or its engine thread is stuck, ``_note_stall``) ends the questions the router is waiting on it for (``down_signal``):
each ends UNAVAILABLE with a sentence naming the worker (``down_error``) within two polls of the worker going silent,
not at its deadline.

**A worker that comes back** (it answers after missing a poll, or from another process) is asked which streams it
holds (``_take_streams_of``; ``services.coordinator``'s module doc says why).
"""

from __future__ import annotations

import asyncio
import logging
import time

from mosaic_core.errors import MosaicError
from services.errors import UnavailableError
from services.telemetry import TelemetryDelta, apply_delta
from services.worker_actor import telemetry_call

log = logging.getLogger(__name__)
# An engine thread with no chance to start a question for this long is stuck: an ingest call takes about a second,
# a first compile or graph capture tens of seconds.
ENGINE_STALL_S = 300.0
# A worker silent this long since its first missed poll is down for its questions (``is_down``): a second poll in a
# row at the earliest, so one late answer from a busy worker (the poll's timeout is 5 s) ends none of them.
DOWN_AFTER_S = 5.0


class TelemetryPollsMixin:
    """``Coordinator``'s telemetry poll, mixed into it: uses the coordinator's ``workers``, ``placement``,
    ``metrics``, ``_alive``, ``_gone``, ``_stalled``, ``_pids``, ``_down_since``, ``_down_signals``, ``_last_lags``,
    ``_to_list`` and ``_pending``, and its ``_call`` and ``_adopt``."""

    def down_signal(self, index: int) -> asyncio.Future:
        """A future that resolves when a poll finds worker ``index`` silent; one per worker, shared by its questions."""
        signal = self._down_signals.get(index)
        if signal is None:
            signal = self._down_signals[index] = asyncio.get_running_loop().create_future()
        return signal

    def is_down(self, index: int) -> bool:
        """Whether worker ``index``'s questions end (``down_signal``): its engine thread is stuck, or it has missed
        polls for ``DOWN_AFTER_S``."""
        silent_since = self._down_since.get(index)
        return index in self._stalled or (silent_since is not None and time.monotonic() - silent_since >= DOWN_AFTER_S)

    def _mark_down(self, index: int) -> None:
        signal = self._down_signals.pop(index, None)
        if signal is not None and not signal.done():
            signal.set_result(None)

    def down_error(self, index: int, stream_id: str) -> UnavailableError:
        """What a question about ``stream_id`` ends with when its worker ``index`` is marked down."""
        if index in self._alive and index in self._stalled:
            why = f"its engine thread has been stuck for over {ENGINE_STALL_S:.0f} s"
        else:
            silent_s = time.monotonic() - self._down_since.get(index, time.monotonic())
            why = f"it stopped answering the router {silent_s:.0f} s ago: frozen, hung or restarting"
        return UnavailableError(
            f"worker {index} is unavailable ({why}), so the question about its stream {stream_id!r} was not answered; "
            "retry shortly"
        )

    async def _delta_of(self, kind: str, index: int, call, timeout_s: float):
        """A worker's answer to a call that hands over what changed since its last one (``call()`` sends it). One
        that outlasts ``timeout_s`` is not abandoned, since the worker has already handed its changes over: the
        next poll waits for the same answer again, instead of asking anew, so a slow answer is applied late, not
        lost."""
        key = (kind, index)
        task = self._pending.get(key)
        if task is None:
            task = self._pending[key] = asyncio.ensure_future(self._call(index, call()))
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout_s)
        finally:
            if task.done():  # answered, or failed: the next poll asks anew
                self._pending.pop(key, None)

    def _report_silent_streams(self, index: int, now: float) -> None:
        """The streams of a worker that does not answer: their lag grows from the last one it reported, and their
        queues, which went with it, are empty."""
        silent_s = now - self._down_since[index]
        for stream_id in [s for s, i in self.placement.items() if i == index]:
            self.metrics.streams.set_stream_lag(stream_id, self._last_lags.get(stream_id, 0.0) + silent_s)
            self.metrics.streams.set_ingest_queue_depth(stream_id, 0)

    async def _take_streams_of(self, index: int, timeout_s: float = 5.0) -> None:
        """The streams worker ``index`` restored that the router did not know (a create whose answer its crash
        lost), after it came back. One it no longer holds (set aside at its restart) stays placed: calls about it get
        NOT_FOUND from the worker, and a DeleteStream clears it; its lag and queue gauges go, which nothing would
        update any more."""
        asked_s = time.monotonic()
        try:
            listing = telemetry_call(self.workers[index].stream_ids).remote()
            held = set(await asyncio.wait_for(self._call(index, listing), timeout_s))
        except (MosaicError, TimeoutError) as err:
            log.warning("worker %d came back but did not list its streams (%s); asked again at its next answer",
                        index, err)  # fmt: skip
            self._to_list.add(index)
            return
        self._to_list.discard(index)
        for stream_id in [s for s, i in self.placement.items() if i == index and s not in held]:
            self.metrics.streams.forget_stream_gauges(stream_id)
        self._adopt(index, held, asked_s)

    # -- telemetry ----------------------------------------------------------------------------------
    def _note_stall(self, index: int, stalled_s: float) -> None:
        """A worker whose engine thread has had no chance to start a question for ``ENGINE_STALL_S`` is not ready
        (it answers polls from another thread); it is again once the thread moves."""
        if stalled_s > ENGINE_STALL_S and index not in self._stalled:
            self._stalled.add(index)
            self._mark_down(index)  # its questions would wait for a thread that does not move
            log.error("worker %d's engine thread has been stuck for %.0f s: it takes no questions or streams until it "
                      "moves", index, stalled_s)  # fmt: skip
        elif stalled_s <= ENGINE_STALL_S and index in self._stalled:
            self._stalled.discard(index)
            log.warning("worker %d's engine thread moves again", index)

    def take_last_telemetry(self, index: int, delta: TelemetryDelta) -> None:
        """A stopped worker's last telemetry (its shutdown's frames, ingested or dropped as ``shutdown``), after the
        drain of a poll the stop cut short if it had answered: no poll takes either any more."""
        cut_short = self._pending.pop(("drain", index), None)
        deltas = [delta]
        if cut_short is not None and cut_short.done() and not cut_short.cancelled() and not cut_short.exception():
            deltas.insert(0, cut_short.result())
        for each in deltas:
            try:
                apply_delta(self.metrics, each, open_streams=set(self.placement))
            except Exception:  # the worker's stop goes on
                log.exception("worker %d's last telemetry could not be applied", index)

    async def poll_telemetry(self, timeout_s: float = 5.0) -> None:
        """Drains every worker's counters into the router's metrics; tracks which workers answer."""
        live = list(range(len(self.workers)))
        # A restarting worker queues calls until it is back; the timeout keeps one from stalling the poll.
        workers = list(enumerate(self.workers))
        calls = (self._delta_of("drain", i, telemetry_call(w.drain_telemetry).remote, timeout_s) for i, w in workers)
        keyframe_calls = (
            self._delta_of("keyframes", i, telemetry_call(w.keyframe_stats).remote, timeout_s) for i, w in workers
        )
        results, keyframes = await asyncio.gather(
            asyncio.gather(*calls, return_exceptions=True), asyncio.gather(*keyframe_calls, return_exceptions=True)
        )
        alive, now = set(), time.monotonic()
        for index, result, keyframe_stats in zip(live, results, keyframes, strict=True):
            if isinstance(result, BaseException):
                self._down_since.setdefault(index, now)
                if index in self._alive:
                    self.metrics.forget_worker(index)
                if self.is_down(index):
                    self._mark_down(index)
                self._report_silent_streams(index, now)
                continue
            alive.add(index)
            self._note_stall(index, result.engine_stalled_s)
            if index in self._gone:  # a worker that answers is not gone: its streams are not deleted behind its back
                self._gone.discard(index)
                self.metrics.set_workers_gone(len(self._gone))
                log.warning("worker %d answers again, though Ray had reported it gone for good", index)
            came_back = index not in self._alive or result.pid != self._pids.get(index, result.pid)
            self._pids[index] = result.pid
            self._down_since.pop(index, None)
            try:  # one worker's surprise must not lose the others' drained counts, nor this round's liveness
                if came_back or index in self._to_list:
                    await self._take_streams_of(index)
                # Placed streams only: an answer given before a delete and applied after it would bring the
                # deleted stream's lag back, and nothing removes it again.
                self._last_lags.update((s, lag) for s, lag in result.lags_s.items() if s in self.placement)
                apply_delta(self.metrics, result, open_streams=set(self.placement))
                if not isinstance(keyframe_stats, BaseException):
                    self.metrics.memory.set_keyframes(index, *keyframe_stats)
            except Exception:
                log.exception("worker %d's telemetry could not be applied this round", index)
        self._alive = alive
        self.metrics.set_workers_up(len(alive))
        self.metrics.set_active_streams(len(self.placement))
