"""How far each worker's start has come, told to the router while the worker's actor is still being built.

A worker builds its engine and restores its streams inside its actor's constructor, and Ray holds every call to an
actor until its constructor returns: the router cannot ask a starting worker anything. So the worker writes a short
line of its progress into Ray's own key-value store (in its GCS, which router and workers share whatever the metadata
store) at most every ``REPORT_INTERVAL_S``, and the router reads it while it waits (``Coordinator.start``): a worker
whose line still changes is restoring, one whose line has not changed for ``worker_start_timeout_s`` is stuck.

Ray's key-value store is reached through ``ray.experimental.internal_kv``, which Ray marks as internal; only this
module uses it.
"""

from __future__ import annotations

import logging
import time

from ray.experimental import internal_kv

from mosaic_core.durable.progress import RestoreProgress, size_text

log = logging.getLogger(__name__)
KV_NAMESPACE = "mosaic-start"
REPORT_INTERVAL_S = 1.0  # between two lines of one worker, but for a pass's first and last step


def _key(namespace: str, worker_id: str) -> str:
    return f"{namespace}/worker-{worker_id}"


class StartReporter:
    """A worker's side: ``stage`` at each step of its start, and the restore's ``RestoreProgress`` as it goes.

    Args:
        namespace: the deployment's namespace (``redis_namespace``), so that two servers on one Ray cluster do not
            read each other's workers.
        worker_id: the worker's index.

    Outside Ray (a ``WorkerCore`` built in-process) it tells nobody: no router waits there.
    """

    def __init__(self, namespace: str, worker_id: str) -> None:
        self._key = _key(namespace, worker_id)
        self._reported_s = float("-inf")
        self._in_ray = internal_kv._internal_kv_initialized()

    def stage(self, text: str) -> None:
        """Tells the router what the worker does now (``building its engine``)."""
        self._put(text)

    def restore_step(self, progress: RestoreProgress) -> None:
        """``RestoreProgress.on_step``: at most every ``REPORT_INTERVAL_S``, and at each pass's first and last step."""
        now = time.monotonic()
        ends = progress.num_done in (0, progress.num_streams)
        if not ends and now - self._reported_s < REPORT_INTERVAL_S:
            return
        self._reported_s = now
        self._put(
            f"restoring history, {progress.doing}: {progress.num_done} of {progress.num_streams} done, with "
            f"{progress.num_records} cluster records ({size_text(progress.num_bytes)}), in {progress.elapsed_s:.1f} s"
        )

    def _put(self, text: str) -> None:
        if not self._in_ray:
            return
        try:
            internal_kv._internal_kv_put(self._key, text.encode(), overwrite=True, namespace=KV_NAMESPACE)
        except Exception as err:  # the start goes on; the router then sees no progress and waits its timeout only
            log.warning("worker start progress could not be told to the router: %s", err)


def read_progress(namespace: str, worker_ids: list[str]) -> dict[str, str | None]:
    """The router's side: each worker's last line, or None where it has told none (blocking: a GCS call each).
    Outside Ray (workers built in-process) every line is None."""
    lines: dict[str, str | None] = dict.fromkeys(worker_ids)
    if not internal_kv._internal_kv_initialized():
        return lines
    for worker_id in worker_ids:
        value = internal_kv._internal_kv_get(_key(namespace, worker_id), namespace=KV_NAMESPACE)
        lines[worker_id] = None if value is None else value.decode()
    return lines


def forget_progress(namespace: str, worker_ids: list[str]) -> None:
    """Deletes the workers' lines of an earlier start, so that this start's wait reads only its own."""
    for worker_id in worker_ids:
        internal_kv._internal_kv_del(_key(namespace, worker_id), namespace=KV_NAMESPACE)
