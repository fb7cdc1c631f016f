"""What the router does about a worker Ray will not restart again (``WorkerGoneError``): it died past its
``MAX_RESTARTS``, or a restart failed to build it.

Nothing serves its streams until the server restarts, when a new worker of its index restores them from its folder of
the data directory. Until then a DeleteStream of one of them still deletes it: nobody else writes that folder (each
worker keeps its own, ``worker-<index>``, and Ray re-creates a dead worker under the same index only, which it will
not do again), so the router deletes the stream's history there itself (``delete_left_behind``: its numbers retired in
the shared ``.retired`` folder first, so a stream created again under its id numbers past the old one's). Where the
router cannot see that folder (a Helm release's router does not mount the history volume), the delete is refused
with a sentence and nothing is changed: forgetting the stream would only bring it back at the next restart.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mosaic_core.durable.left_behind import delete_left_behind
from mosaic_core.durable.retired import RetiredNumbers
from mosaic_core.errors import StateError
from services.errors import WorkerGoneError
from services.worker_actor import MAX_RESTARTS
from services.worker_engine import worker_subdir

log = logging.getLogger(__name__)


def gone_error(index: int) -> WorkerGoneError:
    """The sentence every call about a gone worker's streams gets."""
    return WorkerGoneError(
        f"worker {index} is gone for good: Ray restarts a worker at most {MAX_RESTARTS} times and will not restart "
        f"this one again. Its streams are served again once the server restarts (they are kept in its data "
        "directory); DeleteStream still deletes one of them"
    )


def delete_history_of_gone_worker(data_dir: str | None, index: int, stream_id: str) -> int:
    """Deletes what gone worker ``index`` kept of ``stream_id`` in the data directory; returns its clusters (0 when
    an earlier delete removed it already).

    Raises:
        StateError: the router cannot see the worker's folder; nothing was deleted.
        OSError: the history could not be deleted (a full or failing volume); nothing was deleted.
    """
    folder = Path(data_dir) / worker_subdir(index) if data_dir else None
    if folder is None or not folder.is_dir():
        raise StateError(
            f"stream {stream_id!r} was not deleted: its worker {index} is gone for good, and its history is kept "
            f"in {worker_subdir(index)}/ of the data directory, which this router cannot see (it does not mount the "
            "history volume). Restart the server, which brings the worker back with the stream, then delete it"
        )
    num_clusters = delete_left_behind(folder, stream_id, RetiredNumbers(data_dir))
    if num_clusters is None:
        log.info("stream %s of gone worker %d has no history left in %s", stream_id, index, folder)
        return 0
    log.warning("stream %s of gone worker %d deleted with its %d clusters of history in %s", stream_id, index,
                num_clusters, folder)  # fmt: skip
    return num_clusters
