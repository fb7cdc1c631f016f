"""The router's wait for its workers' start: for as long as they make progress, not for a fixed time.

A worker's start builds its engine (its model's load, then on a GPU each step of its warm-up, a stage each) and
restores its streams from the data directory, and the restore grows with the history kept there: a start that took a
minute may take an hour after months of cameras. So ``worker_start_timeout_s`` bounds a worker's silence, not its
start: the router asks each worker's ``start_state`` (``services.worker_start``) every ``START_POLL_S`` while it
waits, and gives up only on a worker whose state has not changed for that long (silent from the start, stuck, or dead
without Ray saying so yet). A worker whose start failed
fails the wait with its error. It logs every ``START_LOG_S`` how far each worker it still waits for has come.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.errors import WorkerStartError
from services.worker_actor import start_state_call
from services.worker_results import WorkerInfo
from services.worker_start import StartState

log = logging.getLogger(__name__)
START_POLL_S = 1.0  # between two asks of a worker's start state
START_LOG_S = 10.0  # between two lines of this router's log saying how far the workers have come


async def wait_for_workers(workers: list, *, timeout_s: float) -> list[WorkerInfo]:
    """Each worker's ``info()``, once its start is done; raises a worker's start error at once (or its actor's, as
    Ray gives it), and ``TimeoutError`` naming the workers whose start state has not changed for ``timeout_s``."""
    asks: dict[int, asyncio.Future] = {}  # one ask in flight a worker: a process still starting answers none yet
    started_s = logged_s = time.monotonic()
    states: dict[int, StartState | None] = dict.fromkeys(range(len(workers)))
    moved_s = dict.fromkeys(states, started_s)  # when each worker's state last changed (the wait's start at first)
    waiting = list(states)
    try:
        while waiting:
            round_s = time.monotonic()
            for index in waiting:
                if index not in asks:
                    asks[index] = asyncio.ensure_future(start_state_call(workers[index]).remote())
            poll_s = min(START_POLL_S, max(0.0, timeout_s - (round_s - min(moved_s[i] for i in waiting))))
            await asyncio.wait([asks[index] for index in waiting], timeout=poll_s)  # no later than the first give-up
            now = time.monotonic()
            for index in [i for i in waiting if asks[i].done()]:
                state = asks.pop(index).result()  # an actor whose constructor raised: the start fails with its error
                if state != states[index]:
                    states[index], moved_s[index] = state, now
                if state.error is not None:
                    raise WorkerStartError(f"worker {index} did not start: {state.text}")
            waiting = [index for index in waiting if not (states[index] and states[index].ready)]
            if stuck := [index for index in waiting if now - moved_s[index] >= timeout_s]:
                raise TimeoutError(_stuck_text(stuck, states, timeout_s))
            if now - logged_s >= START_LOG_S:
                logged_s = now
                for index in waiting:
                    log.info("waiting %.0f s for worker %d: %s", now - started_s, index, _told(states[index]))
            if waiting:
                await asyncio.sleep(max(0.0, round_s + poll_s - time.monotonic()))
    finally:
        for ask in asks.values():
            ask.cancel()
    return list(await asyncio.gather(*(worker.info.remote() for worker in workers)))


def _told(state: StartState | None) -> str:
    return state.text if state is not None else "it has not answered yet (its process is starting)"


def _stuck_text(stuck: list[int], states: dict, timeout_s: float) -> str:
    said = "; ".join(
        f"worker {index}: " + (f"last told {states[index].text!r}" if states[index] else "it told nothing of its start")
        for index in stuck
    )
    return (
        f"the router gave up on its workers' start: {len(stuck)} of {len(states)} made no progress for {timeout_s:g} s "
        f"(worker_start_timeout_s) ({said}). A worker that is still building its engine or restoring one stream "
        f"after that long needs a larger worker_start_timeout_s; else its log in Ray's session logs says where it is"
    )
