"""The router's wait for its workers' start: for as long as they make progress, not for a fixed time.

A worker's start (its actor's constructor) builds its engine and restores its streams from the data directory, and
the restore grows with the history kept there: a start that took a minute may take an hour after months of cameras.
So ``worker_start_timeout_s`` bounds a worker's silence, not its start: the router reads each worker's progress line
(``services.start_progress``) every ``START_POLL_S`` while it waits, and gives up only on a worker whose line has not
changed for that long (silent from the start, stuck, or dead without Ray saying so yet). It logs every
``START_LOG_S`` how far each worker it still waits for has come.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.start_progress import read_progress
from services.worker_results import WorkerInfo

log = logging.getLogger(__name__)
START_POLL_S = 1.0  # between two reads of the workers' progress lines
START_LOG_S = 10.0  # between two lines of this router's log saying how far the workers have come


async def wait_for_workers(workers: list, *, timeout_s: float, namespace: str) -> list[WorkerInfo]:
    """Each worker's ``info()``, once its constructor has returned; raises a worker's own error at once, and
    ``TimeoutError`` naming the workers whose progress line has not changed for ``timeout_s``."""
    calls = {index: asyncio.ensure_future(w.info.remote()) for index, w in enumerate(workers)}
    infos: dict[int, WorkerInfo] = {}
    started_s = logged_s = time.monotonic()
    lines: dict[int, str | None] = dict.fromkeys(calls)
    moved_s = dict.fromkeys(calls, started_s)  # when each worker's line last changed (the wait's start at first)
    try:
        while len(infos) < len(calls):
            silent_for_s = time.monotonic() - min(moved_s[i] for i in calls if i not in infos)
            poll_s = min(START_POLL_S, max(0.0, timeout_s - silent_for_s))  # no later than the first give-up
            await asyncio.wait([c for i, c in calls.items() if i not in infos], timeout=poll_s)
            for index, call in calls.items():
                if index not in infos and call.done():
                    infos[index] = call.result()  # a constructor that raised: the start fails with its error
            waiting = [index for index in calls if index not in infos]
            if not waiting:
                break
            now = await _read_lines(namespace, waiting, lines, moved_s)
            if stuck := [index for index in waiting if now - moved_s[index] >= timeout_s]:
                raise TimeoutError(_stuck_text(stuck, lines, timeout_s))
            if now - logged_s >= START_LOG_S:
                logged_s = now
                for index in waiting:
                    log.info("waiting %.0f s for worker %d: %s", now - started_s, index,
                             lines[index] or "it has told nothing of its start yet")  # fmt: skip
    finally:
        for call in calls.values():
            call.cancel()
    return [infos[index] for index in range(len(workers))]


async def _read_lines(namespace: str, waiting: list[int], lines: dict, moved_s: dict) -> float:
    """Takes the waiting workers' progress lines into ``lines``, and when each changed into ``moved_s``; returns
    the time read. A read that fails changes nothing: the workers' silence goes on counting."""
    try:
        read = await asyncio.to_thread(read_progress, namespace, [str(index) for index in waiting])
    except Exception as err:
        log.warning("the workers' start progress could not be read: %s", err)
        return time.monotonic()
    now = time.monotonic()
    for index in waiting:
        if (line := read[str(index)]) != lines[index]:
            lines[index], moved_s[index] = line, now
    return now


def _stuck_text(stuck: list[int], lines: dict, timeout_s: float) -> str:
    said = "; ".join(
        f"worker {index}: " + (f"last told {lines[index]!r}" if lines[index] else "it told nothing of its start")
        for index in stuck
    )
    return (
        f"the router gave up on its workers' start: {len(stuck)} of {len(lines)} made no progress for {timeout_s:g} s "
        f"(worker_start_timeout_s) ({said}). A worker that is still building its engine or restoring one stream "
        f"after that long needs a larger worker_start_timeout_s; else its log in Ray's session logs says where it is"
    )
