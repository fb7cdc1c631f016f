"""What a restart checks of a stream's history before the store hands it to the engine, and where what fails goes.

A worker restores all of its streams when it starts. One stream this version cannot restore (a journal field of
the wrong type, KV of another shape: another model's history) must neither keep the others from coming back nor
be adopted half way, so the store checks each stream whole before it registers it, and sets one that fails aside,
out of its id's way and kept for a person:

    <root>/.unreadable/<stream_id>-<8 hex>/          a stream set aside: its folder as it was
    <root>/.unreadable/<stream_id>-<file>-<8 hex>    one record whose summary could not be read (the journal then
                                                     drops its cluster, so nothing carries it forward)

A record the disk fails to read (an I/O error, not a missing or garbled file) may read at the next start, so the
first time it keeps its whole stream where it is, unrestored, and a note in the stream's folder says so
(``READ_ERROR_NOTE``). At the next start the note makes the rule bounded: the records that fail to read again, the
same or others, are set aside as garbled ones are, and the rest of the stream comes back. A start that reads every
record removes the note, so a later passing error is again waited out once.

From this version on, a stream's journal opens with the KV shape it was written with (layers, KV heads, head size,
dtype). An older journal has none; its records' summaries still give layers, heads and head size, which are
checked, but not the dtype. Another checkpoint of the same shape is not told apart (no model fingerprint).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import safe_open

from mosaic_core.durable.manifest import fsync_dir, is_number, write_atomic
from mosaic_core.durable.records import ClusterSummary

log = logging.getLogger(__name__)
UNREADABLE = ".unreadable"  # what a restart could not restore, moved out of its stream id's way and kept
READ_ERROR_NOTE = "read-error.json"  # in a stream's folder: the disk failed to read its records at the last start
STATE_NUMBERS = ("first_timestamp_s", "last_timestamp_s", "frames_ingested", "text_cursor")  # read as numbers


@dataclass(frozen=True, slots=True, kw_only=True)
class KVShape:
    """The KV geometry a stream's records hold: ``[num_layers, 2, num_kv_heads, tokens, head_dim]`` of ``dtype``."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch's name without its prefix: "bfloat16"

    @classmethod
    def of(cls, spec) -> KVShape:
        """The shape of a ``KVSpec``'s KV."""
        return cls(
            num_layers=spec.num_layers,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            dtype=str(spec.dtype).removeprefix("torch."),
        )

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def summary_shape(self) -> tuple[int, int, int]:
        """A record's key sum and sum of squares: ``[num_layers, num_kv_heads, head_dim]``."""
        return (self.num_layers, self.num_kv_heads, self.head_dim)


def check_opened(stream: dict, dir_name: str, kv_shape: KVShape | None) -> str:
    """The stream id of a journal's first line, once what a restart reads of that line is checked.

    Raises:
        ValueError: a field of the wrong type, another folder's stream, or KV of another shape than ``kv_shape``.
    """
    stream_id = stream.get("stream_id")
    if stream_id != dir_name:
        raise ValueError(f"its journal opens stream {stream_id!r}, not {dir_name!r}")
    fps = stream.get("fps")
    if not is_number(fps) or not fps > 0:
        raise ValueError(f"its fps {fps!r} is not a positive number")
    if not isinstance(stream.get("system_prompt"), str | None) or not isinstance(stream.get("meta"), dict | None):
        raise ValueError("its system prompt or meta is of the wrong type")
    for name in ("first_frame_index", "first_cluster_number"):
        value = stream.get(name)
        if value is not None and not (isinstance(value, int) and is_number(value)):
            raise ValueError(f"its {name} {value!r} is not an integer")
    recorded = stream.get("kv")
    if kv_shape is not None and recorded is not None:
        expected = kv_shape.to_json()
        if not isinstance(recorded, dict) or {name: recorded.get(name) for name in expected} != expected:
            raise ValueError(f"its KV shape {recorded} is not this model's {expected}: another model's history")
    return stream_id


def read_summary(path: Path) -> ClusterSummary:
    """A record's summary: only its small tensors are read (the KV pages are read, and checked, when fetched)."""
    with safe_open(str(path), framework="pt") as f:
        return ClusterSummary(f.get_tensor("key_sum"), f.get_tensor("key_sumsq"), float(f.get_tensor("key_count")[0]))


def check_summary(summary: ClusterSummary, expected: tuple[int, ...], cluster_id: str) -> None:
    """Raises ``ValueError`` where a record's summary is not of the ``expected`` shape (another model's KV)."""
    shapes = {tuple(summary.key_sum.shape), tuple(summary.key_sumsq.shape)}
    if shapes != {tuple(expected)}:
        raise ValueError(
            f"cluster {cluster_id} has key statistics of shape {sorted(shapes)}, not {tuple(expected)}: "
            "another model's KV"
        )


def clean_state(state: object, stream_id: str) -> dict:
    """A stream's saved state, less the fields a restart reads as numbers that are not numbers (each logged)."""
    if not isinstance(state, dict):
        log.error("stream %s: its saved state %r is not an object: restored without it", stream_id, state)
        return {}
    kept = dict(state)
    for name in STATE_NUMBERS:
        if kept.get(name) is not None and not is_number(kept[name]):
            log.error("stream %s: its saved %s %r is not a number: restored without it", stream_id, name, kept[name])
            del kept[name]
    return kept


def move_aside(root: Path, path: Path, name: str) -> Path:
    """Moves ``path`` (a stream's folder, or one record) under ``root/.unreadable``, as ``name`` and 8 hex digits."""
    kept = root / UNREADABLE / f"{name}-{uuid.uuid4().hex[:8]}"
    if not kept.parent.is_dir():  # on disk before what moves into it
        kept.parent.mkdir(exist_ok=True)
        fsync_dir(root)
    path.rename(kept)
    fsync_dir(path.parent)
    fsync_dir(kept.parent)
    return kept


def read_failed_before(stream_dir: Path) -> bool:
    """Whether the disk failed to read the stream's records at the last start too (its note is there)."""
    return (stream_dir / READ_ERROR_NOTE).exists()


def note_read_error(stream_dir: Path, file: str, err: OSError) -> None:
    """Notes, for the next start, that reading the record ``file`` failed at this one. A note that cannot be written
    is logged: the next start then leaves the stream once more."""
    note = {"file": file, "error": str(err), "unix_s": time.time()}
    try:
        write_atomic(stream_dir / READ_ERROR_NOTE, json.dumps(note, sort_keys=True).encode())
    except OSError as write_err:
        log.error("cannot note the read error of %s in %s (%s): the next start leaves the stream once more",
                  file, stream_dir, write_err)  # fmt: skip


def clear_read_error(stream_dir: Path) -> None:
    """Removes the note of an earlier start's read error, once the stream is restored (every record read, or set
    aside)."""
    try:
        (stream_dir / READ_ERROR_NOTE).unlink(missing_ok=True)
    except OSError as err:
        log.error("cannot remove %s (%s): a read error at the next start sets records aside at once",
                  stream_dir / READ_ERROR_NOTE, err)  # fmt: skip
