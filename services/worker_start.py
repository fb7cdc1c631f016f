"""A worker's start (its engine built, its streams restored) on a thread of its own, and how far it has come.

Ray holds every call to an actor until its constructor returns, and the restore grows with the history kept in the
data directory: a worker that restored inside its constructor could be asked nothing for minutes. So the constructor
hands the start to ``WorkerStart`` and returns. The router asks ``WorkerCore.start_state`` (on the worker's own
``START_GROUP`` thread, ``services.worker_actor``) how far it has come; every other call is refused
(``check_ready``) until the start is done: UNAVAILABLE while it runs, FAILED_PRECONDITION once it failed, as only a
new start of the server brings that worker back.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from mosaic_core.durable.progress import RestoreProgress, size_text
from services.errors import UnavailableError, WorkerStartError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RestoreCount:
    """One restore pass at its last step (``RestoreProgress``); ``elapsed_s`` is the pass's time at that step, so
    that a count changes only as the restore moves."""

    doing: str
    num_done: int
    num_streams: int
    num_records: int
    num_bytes: int
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class StartState:
    """How far a worker's start has come: its ``stage``, the restore's count while it restores, ready, or the error
    it failed with. Two states are equal only when nothing moved between them: the router gives up on a worker
    whose state stays the same for ``worker_start_timeout_s``."""

    worker_id: str
    stage: str
    restore: RestoreCount | None = None
    ready: bool = False
    error: str | None = None

    @property
    def text(self) -> str:
        """The state for a person: ``restoring history, reopening streams: 3 of 12 done, with 30 cluster records
        (1.2 MiB), in 2.1 s``."""
        if self.error is not None:
            return f"its start failed while {self.stage}: {self.error}"
        count = self.restore
        if count is None or self.ready:
            return self.stage
        return (
            f"{self.stage}, {count.doing}: {count.num_done} of {count.num_streams} done, with {count.num_records} "
            f"cluster records ({size_text(count.num_bytes)}), in {count.elapsed_s:.1f} s"
        )


class WorkerStart:
    """Runs one worker's start on a daemon thread and keeps its ``StartState``.

    Args:
        worker_id: the worker's index, for the state and its sentences.
    """

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self._state = StartState(worker_id, "starting")  # replaced whole: a reader on another thread sees one state
        self._done = threading.Event()
        self._error: BaseException | None = None

    def run(self, start: Callable[[], None]) -> None:
        """Runs ``start`` on a thread of its own; the worker is ready once it returns, failed if it raises."""
        threading.Thread(target=self._run, args=(start,), name=f"worker-{self.worker_id}-start", daemon=True).start()

    def _run(self, start: Callable[[], None]) -> None:
        try:
            start()
        except BaseException as err:  # kept for the router and the calls that follow, which say it
            log.exception("worker %s failed to start while %s", self.worker_id, self._state.stage)
            self._error = err
            self._state = dataclasses.replace(self._state, error=f"{type(err).__name__}: {err}")
        else:
            self._state = dataclasses.replace(self._state, stage="ready", ready=True)
        finally:
            self._done.set()

    @property
    def state(self) -> StartState:
        return self._state

    def stage(self, text: str) -> None:
        """What the start does now (``building its engine``)."""
        self._state = StartState(self.worker_id, text)

    def restore_step(self, progress: RestoreProgress) -> None:
        """``RestoreProgress.on_step``: the restore's count, at every step (on the engine thread)."""
        count = RestoreCount(
            progress.doing,
            progress.num_done,
            progress.num_streams,
            progress.num_records,
            progress.num_bytes,
            progress.elapsed_s,
        )
        self._state = StartState(self.worker_id, "restoring history", count)

    def check_ready(self) -> None:
        """Raises ``UnavailableError`` while the start runs, ``WorkerStartError`` once it failed."""
        state = self._state
        if state.ready:
            return
        if state.error is not None:
            raise WorkerStartError(
                f"worker {self.worker_id} is not serving: {state.text}. Its streams are served again once the "
                "server restarts"
            )
        raise UnavailableError(f"worker {self.worker_id} is still starting: {state.text}; retry shortly")

    def wait(self, timeout_s: float) -> None:
        """Until the start is done: raises its error if it failed, ``TimeoutError`` if it is not done in
        ``timeout_s``."""
        if not self._done.wait(timeout_s):
            raise TimeoutError(f"worker {self.worker_id} did not start within {timeout_s:g} s: {self._state.text}")
        if self._error is not None:
            raise self._error
