"""What the router does about a worker Ray will not restart again (``WorkerGoneError``): it died past its
``MAX_RESTARTS`` (``services.worker_actor``), or a restart failed to build it.

Nothing serves its streams until the server restarts, when a new worker of its index restores them from its folder of
the data directory. Until then a DeleteStream of one of them still deletes it: nobody else writes that folder (each
worker keeps its own, ``worker-<index>``, and only Ray's restart of this very actor would write it again, which Ray
will not do), so the stream's history there is deleted from outside its worker (``delete_left_behind``: its numbers
retired in the shared ``.retired`` folder first, so a stream created again under its id numbers past the old one's):
by the router where it sees the folder, else by a live worker, which shares the data directory (a Helm release's
router does not mount the history volume; its worker pods share it). Where neither can, the delete is refused with a
sentence and nothing is changed: forgetting the stream would only bring it back at the next restart. A disk that fails
the delete (a full or failing volume) refuses it the same way (``HistoryNotDeletedError``, its path in the log only),
and a retry once the volume is fixed deletes it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mosaic_core.durable.left_behind import delete_left_behind
from mosaic_core.durable.retired import RetiredNumbers
from mosaic_core.errors import StateError
from services.errors import HistoryNotDeletedError, WorkerGoneError
from services.worker_engine import worker_subdir

log = logging.getLogger(__name__)


def gone_error(index: int, max_restarts: int) -> WorkerGoneError:
    """The sentence every call about a gone worker's streams gets (``max_restarts``: the actor's)."""
    return WorkerGoneError(
        f"worker {index} is gone for good: Ray restarts a worker at most {max_restarts} times and will not restart "
        f"this one again. Its streams are served again once the server restarts (they are kept in its data "
        "directory); DeleteStream still deletes one of them"
    )


def unreachable_error(stream_id: str, index: int, reasons: list[str]) -> StateError:
    """The sentence of a delete refused because neither the router nor a live worker sees the gone worker's folder."""
    return StateError(
        f"stream {stream_id!r} was not deleted: its worker {index} is gone for good, and its history in "
        f"{worker_subdir(index)}/ of the data directory could be deleted neither by this router nor by a live worker "
        f"({'; '.join(reasons)}). Restart the server, which brings the worker back with the stream, then delete it"
    )


def delete_history_of_gone_worker(data_dir: str | None, index: int, stream_id: str) -> int:
    """Deletes what gone worker ``index`` kept of ``stream_id`` in the data directory; returns its clusters (0 when
    an earlier delete removed it already).

    Raises:
        StateError: this process cannot see the worker's folder; nothing was deleted.
        HistoryNotDeletedError: the history could not be deleted (a full or failing volume; the log names the disk's
            error); nothing was deleted.
    """
    if not data_dir:
        raise StateError("this process has no data directory")
    folder = Path(data_dir) / worker_subdir(index)
    if not folder.is_dir():
        log.info("stream %s of gone worker %d: %s is not on this machine", stream_id, index, folder)
        raise StateError(f"{worker_subdir(index)}/ of the data directory is not on this machine")
    try:
        num_clusters = delete_left_behind(folder, stream_id, RetiredNumbers(data_dir))
    except OSError as err:
        log.error("stream %s of gone worker %d: deleting its history in %s failed: %s", stream_id, index, folder, err)
        raise HistoryNotDeletedError(
            f"stream {stream_id!r} was not deleted: its history in {worker_subdir(index)}/ of the data directory could "
            "not be deleted from the disk (a full or failing volume; the server log names the error). Nothing was "
            "deleted: retry DeleteStream once the volume is fixed"
        ) from None
    if num_clusters is None:
        log.info("stream %s of gone worker %d has no history left in %s", stream_id, index, folder)
        return 0
    log.warning("stream %s of gone worker %d deleted with its %d clusters of history in %s", stream_id, index,
                num_clusters, folder)  # fmt: skip
    return num_clusters
