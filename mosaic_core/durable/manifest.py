"""A stream's manifest: an append-only journal of which sealed cluster files make up its history.

Plain Python (no torch), so it can be read and tested without the engine. One directory per stream:

    <root>/<stream_id>/
        manifest.jsonl     one JSON object a line, each with its own CRC-32: the journal
        state.json         the stream's clock and counters, replaced atomically (at most a few seconds stale)
        c000012.mkv        one sealed cluster's record (see ``records``), written before its journal line

Journal lines:

    {"op": "open",   "stream": {...}}                          first line: what the stream was opened with
    {"op": "commit", "add": [entry, ...], "remove": [id, ...]}  a seal, a merge, or a retention drop
    {"op": "ids",    "next": 1088, "frames": 5120}             cluster numbers below next, and frame indices below
                                                               frames (they name keyframes), may have been used

A commit is one line, so a merge (two clusters out, one in) is all or nothing. A crash can tear only the last
line (it was never acknowledged), and replay ignores a torn last line. An append that fails part-way is cut back to
where it began, so its retry never follows half a line. A line that still fails its CRC before others (the disk
damaged it, or cutting it back failed) is skipped and counted (``damaged_lines``): the lines after it were
acknowledged, so they still count, and the journal as it was is kept beside it (``DAMAGED_PREFIX``), since the
line skipped may have named clusters whose files no line names now.
Record files that no line names are orphans of a crash between writing a file and its line; the store deletes
them, unless the stream's journal was ever damaged.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
    def from_json(cls, data: dict) -> ClusterEntry:
        return cls(**data)


@dataclass(slots=True)
class ManifestState:
    """What replaying a manifest gives back."""

    stream: dict = field(default_factory=dict)
    clusters: dict[str, ClusterEntry] = field(default_factory=dict)  # in commit order
    next_cluster_number: int = 0
    next_frame_index: int = 0  # 0 in journals from before frame indices were reserved
    num_lines: int = 0
    torn_tail: bool = False
    damaged_lines: int = 0  # lines that failed their CRC before the last one, skipped


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
    skipped and counted (module doc)."""
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
            _apply(state, record)
        elif number == len(lines):
            state.torn_tail = True
        else:
            state.damaged_lines += 1
    return state


def _apply(state: ManifestState, record: dict) -> None:
    op = record.get("op")
    if op == "open":
        state.stream = record["stream"]
    elif op == "commit":
        for cluster_id in record.get("remove", []):
            state.clusters.pop(cluster_id, None)
        for data in record.get("add", []):
            entry = ClusterEntry.from_json(data)
            state.clusters[entry.cluster_id] = entry
            state.next_cluster_number = max(state.next_cluster_number, cluster_number(entry.cluster_id) + 1)
    elif op == "ids":
        state.next_cluster_number = max(state.next_cluster_number, int(record["next"]))
        state.next_frame_index = max(state.next_frame_index, int(record.get("frames", 0)))


def cluster_number(cluster_id: str) -> int:
    """``cam/c000012`` -> 12."""
    return int(cluster_id.rsplit("/c", 1)[1])


class ManifestWriter:
    """Appends journal lines with fsync; rewrites the journal compactly when dead lines pile up."""

    def __init__(self, stream_dir: Path, state: ManifestState) -> None:
        self.stream_dir = stream_dir
        self.state = state
        self.path = stream_dir / MANIFEST_NAME
        if state.damaged_lines:  # kept as it was, before a compaction drops the damaged lines
            write_atomic(stream_dir / f"{DAMAGED_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}.jsonl", self.path.read_bytes())
        if state.torn_tail or state.damaged_lines:  # so later lines are not appended after garbage
            self.compact()

    def append(self, record: dict) -> None:
        """One journal line, on disk when this returns. A write that fails part-way is cut back to where the line
        began, so that a retry never follows half a line."""
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
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)
        self.state.num_lines += 1
        _apply(self.state, record)
        if self.state.num_lines > 2 * len(self.state.clusters) + 64:
            self.compact()

    def compact(self) -> None:
        """One line per live cluster, written to a new file that replaces the journal atomically."""
        lines = [encode_line({"op": "open", "stream": self.state.stream})]
        lines += [encode_line({"op": "commit", "add": [asdict(e)], "remove": []}) for e in self.state.clusters.values()]
        ids = {"op": "ids", "next": self.state.next_cluster_number, "frames": self.state.next_frame_index}
        lines.append(encode_line(ids))
        write_atomic(self.path, b"".join(lines))
        self.state.num_lines = len(lines)
        self.state.torn_tail = False


def write_atomic(path: Path, data: bytes | Sequence[bytes | memoryview]) -> None:
    """Temporary file, fsync, rename, fsync of the directory: a reader sees the old file or the new one. ``data``
    may be chunks, written in order."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        for chunk in [data] if isinstance(data, bytes) else data:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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
