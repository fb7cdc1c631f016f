"""Deleting the history a stream left behind when the engine that kept it is gone for good (a worker Ray no longer
restarts): no ``DurableStore`` holds the folder any more, so another process deletes it as ``delete_stream`` would.

Its numbers are retired first, read from the folder as ``set_aside`` reads them (``retired.numbers_given_out``), so
that a stream created again under its id, on another engine, numbers past every cluster and frame the old one may
have named; then the folder moves into the root's trash in one rename, and the root is synced: a crash after that
never brings the stream back. A failure before the rename leaves the folder whole, and a retry deletes it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from mosaic_core.durable.loading import move_to_trash
from mosaic_core.durable.manifest import RECORD_SUFFIX, replay
from mosaic_core.durable.retired import RetiredNumbers, numbers_given_out

log = logging.getLogger(__name__)


def delete_left_behind(root: str | Path, stream_id: str, retired: RetiredNumbers) -> int | None:
    """Deletes the history of ``stream_id`` kept in ``root`` (one engine's data folder), whose engine is gone.

    Returns:
        The clusters the history held, or None when ``root`` holds no history of the stream (deleted already).

    Raises:
        OSError: the numbers could not be retired or the folder not moved; nothing was deleted.
    """
    root = Path(root)
    stream_dir = root / stream_id
    if not stream_dir.is_dir():
        return None
    num_clusters = _num_clusters(stream_dir)
    retired.retire(stream_id, numbers_given_out(stream_dir))  # first: a crash in between leaves both
    target = move_to_trash(root, stream_dir)
    shutil.rmtree(target, ignore_errors=True)  # what is left the engine's next start empties with its trash
    return num_clusters


def _num_clusters(stream_dir: Path) -> int:
    """The clusters the stream's journal holds; its record files where the journal cannot be replayed."""
    try:
        return len(replay(stream_dir).clusters)
    except (OSError, ValueError) as err:
        log.warning("cannot replay the journal of %s (%s); its record files are counted instead", stream_dir, err)
        return sum(1 for path in stream_dir.glob(f"c*{RECORD_SUFFIX}"))
