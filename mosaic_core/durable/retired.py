"""Where a stream id's numbers start when a stream is opened again under an id that an ended stream had.

A stream numbers its clusters (``cam/c000012``) and its frames, which name its keyframes (``cam/f40``). A client
may keep such an id (an answer's evidence) past the stream's deletion. Were a new stream of that id to count from
0 again, the old id would name another cluster or picture; so closing a stream retires its next numbers here, and
a stream opened later under that id counts on from them. An old id then names nothing, and a lookup says so.

With a folder (``EngineConfig.retired_ids_dir``, else ``data_dir``) the numbers are kept in it, one small file per
stream id, so they outlive a restart; a service's workers share one, since a stream deleted on one worker may be
created again on another:

    <folder>/.retired/<stream_id>.json    {"next_cluster_number": 71, "next_frame_index": 5230}

A file is read afresh whenever a stream of its id opens, and written by the engine that closes one: a stream id is
open on one engine at a time. Plain Python (no torch).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mosaic_core.durable.manifest import write_atomic

log = logging.getLogger(__name__)
RETIRED_DIR = ".retired"  # hidden: ``DurableStore.load_streams`` passes over folders named with a leading dot


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamNumbers:
    """The numbers a stream's next cluster and next frame get."""

    next_cluster_number: int = 0
    next_frame_index: int = 0

    def at_least(self, other: StreamNumbers) -> StreamNumbers:
        """Each number the larger of this one's and ``other``'s."""
        return StreamNumbers(
            next_cluster_number=max(self.next_cluster_number, other.next_cluster_number),
            next_frame_index=max(self.next_frame_index, other.next_frame_index),
        )


FROM_ZERO = StreamNumbers()  # where a stream id never used before starts


class RetiredNumbers:
    """The next numbers of streams that ended, by stream id: in files under ``root`` when one is given (module
    doc), else in memory."""

    def __init__(self, root: str | Path | None) -> None:
        self._dir = None if root is None else Path(root) / RETIRED_DIR
        self._in_memory: dict[str, StreamNumbers] = {}

    def start_of(self, stream_id: str) -> StreamNumbers:
        """Where a stream opened under ``stream_id`` starts counting: past every number an ended stream of that id
        gave out (zeros for an id never used)."""
        if self._dir is None:
            return self._in_memory.get(stream_id, FROM_ZERO)
        return self._read(stream_id)

    def retire(self, stream_id: str, numbers: StreamNumbers) -> None:
        """Records that a stream of ``stream_id`` ended at ``numbers``; on disk, when there is a root, once this
        returns."""
        kept = self.start_of(stream_id).at_least(numbers)
        if self._dir is None:
            self._in_memory[stream_id] = kept
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        body = {"next_cluster_number": kept.next_cluster_number, "next_frame_index": kept.next_frame_index}
        write_atomic(self._dir / f"{stream_id}.json", json.dumps(body, sort_keys=True).encode())

    def _read(self, stream_id: str) -> StreamNumbers:
        path = self._dir / f"{stream_id}.json"
        try:
            data = json.loads(path.read_text())
            return StreamNumbers(
                next_cluster_number=int(data["next_cluster_number"]), next_frame_index=int(data["next_frame_index"])
            )
        except FileNotFoundError:
            return FROM_ZERO
        except (OSError, ValueError, KeyError, TypeError) as err:
            # One damaged file must not keep its stream id from ever being opened again: it counts from 0, as it
            # did before these files existed, and says so.
            log.error(
                "cannot read %s (%s): stream %s counts its clusters and frames from 0, so an id kept from an "
                "earlier stream of that id may name one of the new stream's", path, err, stream_id,
            )  # fmt: skip
            return FROM_ZERO
