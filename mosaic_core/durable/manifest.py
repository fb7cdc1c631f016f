"""A stream's manifest: an append-only journal of which sealed cluster files make up its history.

Plain Python (no torch), so it can be read and tested without the engine. One directory per stream:

    <root>/<stream_id>/
        manifest.jsonl     one JSON object a line, each with its own CRC-32: the journal
        state.json         the stream's clock and counters, replaced atomically (at most a few seconds stale, but
                           for fields written at once: ``DurableStore.write_state``)
        c000012.mkv        one sealed cluster's record (see ``records``), written before its journal line

Journal lines:

    {"op": "open",   "stream": {...}}                          first line: what the stream was opened with
    {"op": "commit", "add": [entry, ...], "remove": [id, ...]}  a seal, a merge, or a retention drop
    {"op": "ids",    "next": 1088, "frames": 5120}             cluster numbers below next, and frame indices below
                                                               frames (they name keyframes), may have been used

A commit is one line, so a merge (two clusters out, one in) is all or nothing. A crash can tear only the last
line (it was never acknowledged, and has no newline), and replay ignores a torn last line. An append that fails
part-way is cut back to where it began, so its retry never follows half a line; where cutting it back fails too,
the next append first rewrites the journal from memory. A line that still fails its CRC (the disk damaged it, or
it ends a file with its newline, so it was acknowledged) is skipped and counted (``damaged_lines``): the lines after
it were acknowledged, so they still count, and the journal as it was is kept beside it (``DAMAGED_PREFIX``), since the
line skipped may have named clusters whose files no line names now.
A line whose CRC holds but which this version cannot apply (a field it needs is missing or of the wrong type)
raises ``ValueError`` from ``replay``: the store sets that stream aside. Fields it does not know (a newer version's,
read after a rollback) are ignored and named in ``unknown_fields``; a compaction drops them.
Record files that no line names are orphans of a crash between writing a file and its line; the store deletes
them, unless the stream's journal was ever damaged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
DAMAGED_PREFIX = "manifest.damaged-"  # a copy of a journal as it was when replay found a damaged line in it
STATE_NAME = "state.json"
RECORD_SUFFIX = ".mkv"


@dataclass(slots=True, kw_only=True)
class ClusterEntry:
    """One sealed cluster as the manifest records it: enough to re-adopt it without reading its bytes."""

    cluster_id: str
    file: str  # name inside the stream directory
    start_s: float
    end_s: float
    frame_indices: list[int]
    frame_timestamps_s: list[float]
    frame_num_tokens: list[int]
    num_bytes: int  # KV bytes, over all layers
    checksum: str  # CRC-32 (hex) of the record's tensor payload
    position_end: int  # the stream's text position after the cluster's last frame
    # The cluster's keyframes, in the order their JPEG bytes follow one another in the record's ``keyframes``
    # tensor: {"frame_index", "timestamp_s", "width", "height", "num_bytes"} each. Older records have none.
    keyframes: list[dict] = field(default_factory=list)
    # Its age for the history budget (Unix seconds): when it sealed, or for a merge or a split, when the oldest
    # cluster it replaced sealed. None in older records, whose file's modification time stands in.
    sealed_unix_s: float | None = None

    @property
    def num_tokens(self) -> int:
        return sum(self.frame_num_tokens)

    @classmethod
    def from_json(cls, data: dict, unknown: set[str] | None = None) -> ClusterEntry:
        """The entry a journal line holds. Fields this version does not know are left out (and added to
        ``unknown``).

        Raises:
            ValueError: a field it needs is missing, or of the wrong type.
        """
        known = {f.name for f in fields(cls)}
        if unknown is not None:
            unknown.update(data.keys() - known)
        try:
            entry = cls(**{name: value for name, value in data.items() if name in known})
        except TypeError as err:  # a field missing
            raise ValueError(f"journal entry {data.get('cluster_id')!r} cannot be read: {err}") from err
        problem = entry._problem()
        if problem:
            raise ValueError(f"journal entry {data.get('cluster_id')!r} cannot be read: {problem}")
        return entry

    def _problem(self) -> str:
        """What is wrong with a read entry's fields ("" if nothing): each is used as its type says at a restart."""
        numbers = {"start_s": self.start_s, "end_s": self.end_s}
        integers = {"num_bytes": self.num_bytes, "position_end": self.position_end}
        lists = (self.frame_indices, self.frame_timestamps_s, self.frame_num_tokens)
        if not isinstance(self.cluster_id, str) or "/c" not in self.cluster_id:
            return f"cluster_id {self.cluster_id!r} is not a cluster id"
        if not isinstance(self.file, str) or Path(self.file).name != self.file or not self.file:
            return f"file {self.file!r} is not a file name"
        if not isinstance(self.checksum, str):
            return f"checksum {self.checksum!r} is not a string"
        for name, value in {**numbers, **integers}.items():
            if not is_number(value) or (name in integers and not isinstance(value, int)):
                return f"{name} {value!r} is not a number of its kind"
        if self.sealed_unix_s is not None and not is_number(self.sealed_unix_s):
            return f"sealed_unix_s {self.sealed_unix_s!r} is not a number"
        if not all(isinstance(values, list) and values for values in lists) or len({len(v) for v in lists}) != 1:
            return "its frame lists are not non-empty lists of one length"
        if not all(isinstance(v, int) and is_number(v) for v in (*self.frame_indices, *self.frame_num_tokens)):
            return "its frame indices or token counts are not integers"
        if not all(is_number(v) for v in self.frame_timestamps_s):
            return "its frame timestamps are not numbers"
        keyframe_fields = ("frame_index", "timestamp_s", "width", "height", "num_bytes")
        if not isinstance(self.keyframes, list) or not all(
            isinstance(k, dict) and all(is_number(k.get(name)) for name in keyframe_fields) for k in self.keyframes
        ):
            return "its keyframes are not a list of keyframe entries"
        try:
            cluster_number(self.cluster_id)
        except ValueError:
            return f"cluster_id {self.cluster_id!r} has no cluster number"
        return ""


def is_number(value: object) -> bool:
    """An int or a float, not a bool: what a journal's numeric fields hold."""
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(slots=True)
class ManifestState:
    """What replaying a manifest gives back."""

    stream: dict = field(default_factory=dict)
    clusters: dict[str, ClusterEntry] = field(default_factory=dict)  # in commit order
    next_cluster_number: int = 0
    next_frame_index: int = 0  # 0 in journals from before frame indices were reserved
    num_lines: int = 0
    torn_tail: bool = False
    damaged_lines: int = 0  # complete lines (with their newline) that failed their CRC, skipped
    unknown_fields: set[str] = field(default_factory=set)  # cluster entries' fields this version does not know


def encode_line(record: dict) -> bytes:
    body = json.dumps(record, separators=(",", ":"), sort_keys=True)
    return f"{zlib.crc32(body.encode()):08x} {body}\n".encode()


def decode_line(line: bytes) -> dict | None:
    """The record of one journal line, or None if the line is torn or corrupt."""
    try:
        text = line.decode().rstrip("\n")
        crc, body = text.split(" ", 1)
        if int(crc, 16) != zlib.crc32(body.encode()):
            return None
        return json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None


def replay(stream_dir: Path) -> ManifestState:
    """Rebuilds a stream's history from its journal; a torn last line is ignored, and a damaged line before it is
    skipped and counted (module doc).

    Raises:
        ValueError: a line this version cannot apply.
    """
    state = ManifestState()
    path = stream_dir / MANIFEST_NAME
    if not path.exists():
        return state
    *ended, last = path.read_bytes().split(b"\n")
    lines = [raw + b"\n" for raw in ended] + ([last] if last else [])
    for number, raw in enumerate(lines, start=1):
        record = decode_line(raw)
        if record is not None and raw.endswith(b"\n"):
            state.num_lines += 1
            try:
                _apply(state, record)
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"line {number} of {path} cannot be applied: {err}") from err
        elif number == len(lines) and not raw.endswith(b"\n"):  # cut short by a crash: never acknowledged
            state.torn_tail = True
        else:
            state.damaged_lines += 1
    return state


def _apply(state: ManifestState, record: dict) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{record!r} is not a journal record")
    op = record.get("op")
    if op == "open":
        if not isinstance(record.get("stream"), dict):
            raise ValueError(f"the journal's first line opens {record.get('stream')!r}, not a stream")
        state.stream = record["stream"]
    elif op == "commit":
        for cluster_id in record.get("remove", []):
            state.clusters.pop(cluster_id, None)
        for data in record.get("add", []):
            if not isinstance(data, dict):
                raise ValueError(f"a commit adds {data!r}, not a cluster entry")
            entry = ClusterEntry.from_json(data, state.unknown_fields)
            state.clusters[entry.cluster_id] = entry
            state.next_cluster_number = max(state.next_cluster_number, cluster_number(entry.cluster_id) + 1)
    elif op == "ids":
        state.next_cluster_number = max(state.next_cluster_number, int(record["next"]))
        state.next_frame_index = max(state.next_frame_index, int(record.get("frames", 0)))


def cluster_number(cluster_id: str) -> int:
    """``cam/c000012`` -> 12."""
    return int(cluster_id.rsplit("/c", 1)[1])


class ManifestWriter:
    """Appends journal lines with fsync; rewrites the journal compactly when dead lines pile up.

    A journal replayed with a torn or damaged line is rewritten before anything is appended to it (a damaged one is
    copied aside first). Where that cannot be done yet (a full disk), the writer is made anyway, so the stream can
    be restored, and its first append tries again before it writes its line.
    """

    def __init__(self, stream_dir: Path, state: ManifestState) -> None:
        self.stream_dir = stream_dir
        self.state = state
        self.path = stream_dir / MANIFEST_NAME
        self._copy_due = state.damaged_lines > 0  # kept as it was, before a compaction drops the damaged lines
        self._rewrite_due = state.torn_tail or state.damaged_lines > 0  # so lines are not appended after garbage
        self._compact_failures = 0
        try:
            self._repair()
        except OSError as err:
            log.error("cannot rewrite the journal %s yet (%s): its next append tries again first", self.path, err)

    def _repair(self) -> None:
        if self._copy_due:
            write_atomic(self.stream_dir / f"{DAMAGED_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}.jsonl",
                         self.path.read_bytes())  # fmt: skip
            self._copy_due = False
        if self._rewrite_due:
            self.compact()

    def append(self, record: dict) -> None:
        """One journal line, on disk when this returns. A write that fails part-way is cut back to where the line
        began, so that a retry never follows half a line. A compaction after it that fails is logged, not raised:
        the line is on disk, and the next append compacts again."""
        if self._copy_due or self._rewrite_due:
            self._repair()
        line = encode_line(record)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                written = 0
                while written < len(line):
                    written += os.write(fd, line[written:])
                os.fsync(fd)
            except BaseException:
                try:
                    os.ftruncate(fd, start)
                except OSError:  # half a line stays: the next append first rewrites the journal from memory
                    self._rewrite_due = True
                raise
        finally:
            os.close(fd)
        self.state.num_lines += 1
        _apply(self.state, record)
        if self.state.num_lines > 2 * len(self.state.clusters) + 64:
            try:
                self.compact()
                self._compact_failures = 0
            except Exception as err:  # raised, it would have the caller append the line again
                self._compact_failures += 1
                if self._compact_failures == 1 or self._compact_failures % 100 == 0:
                    log.error("cannot compact the journal %s (failure %d; tried again at each append): %s",
                              self.path, self._compact_failures, err)  # fmt: skip

    def compact(self) -> None:
        """One line per live cluster, written to a new file that replaces the journal atomically."""
        lines = [encode_line({"op": "open", "stream": self.state.stream})]
        lines += [encode_line({"op": "commit", "add": [asdict(e)], "remove": []}) for e in self.state.clusters.values()]
        ids = {"op": "ids", "next": self.state.next_cluster_number, "frames": self.state.next_frame_index}
        lines.append(encode_line(ids))
        write_atomic(self.path, b"".join(lines))
        self.state.num_lines = len(lines)
        self.state.torn_tail = False
        self._rewrite_due = False


def write_atomic(path: Path, data: bytes | Sequence[bytes | memoryview]) -> None:
    """Temporary file, fsync, rename, fsync of the directory: a reader sees the old file or the new one. ``data``
    may be chunks, written in order."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            for chunk in [data] if isinstance(data, bytes) else data:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Kept, a partial file would hold the room it took on a full disk until its own retry: a write at the
        # head of the queue, retried, would never get the room freed for it.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_state(stream_dir: Path) -> dict:
    path = stream_dir / STATE_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
