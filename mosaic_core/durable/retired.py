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
open on one engine at a time. A stream a restart sets aside (``DurableStore.load_streams``) frees its id as a
deleted one does, so its numbers are retired the same way, read from its folder (``numbers_given_out``) before it
moves. Plain Python (no torch).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mosaic_core.durable.manifest import (
    DAMAGED_PREFIX,
    MANIFEST_NAME,
    RECORD_SUFFIX,
    STATE_NAME,
    cluster_number,
    decode_line,
    fsync_dir,
    is_number,
    write_atomic,
)

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
        if not self._dir.is_dir():  # made once, and on disk before the file in it: a power cut keeps both or neither
            self._dir.mkdir(parents=True, exist_ok=True)
            fsync_dir(self._dir.parent)
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


def numbers_given_out(stream_dir: Path) -> StreamNumbers:
    """Past every cluster number and frame index a stream's folder shows it may have given out: its journal's
    reservations, its clusters and their frames, its first line's starting numbers, its saved frame count and its
    record files' names. Read leniently, since the folder may be one this version cannot restore: lines that fail
    their CRC and fields of the wrong type are passed over, and the copies of a damaged journal are read too.

    Raises:
        OSError: a file the numbers are in cannot be read (a missing journal or state is read as empty).
    """
    clusters, frames, first_frame = [0], [0], 0
    for path in stream_dir.iterdir():
        if path.suffix == RECORD_SUFFIX and path.stem.startswith("c") and path.stem[1:].isdigit():
            clusters.append(int(path.stem[1:]) + 1)
    journals = [stream_dir / MANIFEST_NAME, *stream_dir.glob(f"{DAMAGED_PREFIX}*")]
    for record in (decode_line(line) for journal in journals for line in _lines(journal)):
        if not isinstance(record, dict):
            continue
        if record.get("op") == "open" and isinstance(record.get("stream"), dict):
            clusters.append(_integer(record["stream"].get("first_cluster_number")))
            first_frame = max(first_frame, _integer(record["stream"].get("first_frame_index")))
        elif record.get("op") == "ids":
            clusters.append(_integer(record.get("next")))
            frames.append(_integer(record.get("frames")))
        elif record.get("op") == "commit" and isinstance(record.get("add"), list):
            for entry in (e for e in record["add"] if isinstance(e, dict)):
                clusters.append(_number_after(entry.get("cluster_id")))
                indices = entry.get("frame_indices")
                frames += [_integer(i) + 1 for i in indices] if isinstance(indices, list) else []
    try:
        state = json.loads((stream_dir / STATE_NAME).read_text())
    except (FileNotFoundError, ValueError):  # garbled: the journal's reservations cover the frames it counted
        state = {}
    frames_ingested = _integer(state.get("frames_ingested")) if isinstance(state, dict) else 0
    frames.append(first_frame + frames_ingested)
    return StreamNumbers(next_cluster_number=max(clusters), next_frame_index=max(frames))


def _lines(journal: Path) -> list[bytes]:
    try:
        return journal.read_bytes().splitlines(keepends=True)
    except FileNotFoundError:
        return []


def _integer(value: object) -> int:
    """``value`` where it is an integer, else 0 (a field of the wrong type)."""
    return value if isinstance(value, int) and is_number(value) else 0


def _number_after(cluster_id: object) -> int:
    try:
        return cluster_number(cluster_id) + 1
    except (AttributeError, IndexError, ValueError):
        return 0
