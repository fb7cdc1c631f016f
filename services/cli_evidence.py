"""``mosaic query --save-evidence DIR``: an answer's evidence frames, written as JPEG files named by camera and time.

    DIR/cam-1_41.000s.jpg    the keyframe of camera cam-1 taken at 41.000 s on its clock
    DIR/cam-3_1733050841.250s.jpg

Names are built here from the keyframe's stream id and timestamp, never from a string the server sent as a path;
a stream id that is not a valid one, a name that would resolve outside DIR, or a symlink planted in DIR is
refused, so a misbehaving server cannot make the command write anywhere else.
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

# mosaic_core.engine.stream's pattern, repeated: importing it would load torch into every `mosaic` command.
STREAM_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

MAX_IDS_PER_CALL = 64


class EvidencePathError(ValueError):
    """A keyframe's file would land outside the evidence directory."""


def add_save_evidence_flag(parser) -> None:
    parser.add_argument(
        "--save-evidence",
        metavar="DIR",
        type=Path,
        default=None,
        help="write the answer's evidence frames (JPEG keyframes) into DIR, named <camera>_<seconds>s.jpg",
    )


def evidence_path(directory: Path, stream_id: str, timestamp_s: float, frame_index: int | None = None) -> Path:
    """``directory/<stream_id>_<timestamp_s>s.jpg`` (``..._f<frame_index>.jpg`` with a frame index, for a second
    keyframe of one stream at the same millisecond), checked to stay directly inside ``directory``."""
    if not isinstance(stream_id, str) or not STREAM_ID_PATTERN.fullmatch(stream_id):
        raise EvidencePathError(f"refusing a keyframe of stream {stream_id!r}: not a valid stream id")
    if not math.isfinite(timestamp_s):
        raise EvidencePathError(f"refusing a keyframe of stream {stream_id!r} at time {timestamp_s!r}")
    root = directory.resolve()
    frame = "" if frame_index is None else f"_f{int(frame_index)}"
    path = root / f"{stream_id}_{timestamp_s:.3f}s{frame}.jpg"
    if path.resolve().parent != root:
        raise EvidencePathError(f"refusing to write {path}: it is not inside {root}")
    return path


def write_keyframe(path: Path, jpeg: bytes) -> None:
    """Writes (or replaces) one file, never through a symlink someone left at that name."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(jpeg)


def save_evidence(client, spans, directory: Path) -> tuple[list[Path], list[str]]:
    """Fetches every span's keyframes (once each) and writes them into ``directory`` (made at the first file); returns
    the files written and the ids the server no longer holds (a forming cluster's candidate that a later frame
    replaced, or a cluster dropped since the answer), which cost only themselves."""
    wanted: dict[str, list[str]] = {}
    for span in spans:
        ids = wanted.setdefault(span.stream_id, [])
        ids.extend(k for k in span.keyframe_ids if k not in ids)
    written, gone = [], []
    for stream_id, ids in wanted.items():
        for start in range(0, len(ids), MAX_IDS_PER_CALL):
            for keyframe in _fetch(client, stream_id, ids[start : start + MAX_IDS_PER_CALL], gone):
                path = evidence_path(directory, keyframe.stream_id, keyframe.timestamp_s)
                if path in written:  # another keyframe of this camera at the same millisecond
                    path = evidence_path(directory, keyframe.stream_id, keyframe.timestamp_s, keyframe.frame_index)
                directory.mkdir(parents=True, exist_ok=True)
                write_keyframe(path, keyframe.jpeg)
                written.append(path)
    return written, gone


def _fetch(client, stream_id: str, ids: list[str], gone: list[str]) -> list:
    """The keyframes of ``ids`` the server holds: a call is all or nothing, so after NOT_FOUND each id is asked
    alone, and those NOT_FOUND again go to ``gone``. A reply too large for the server's message limit
    (RESOURCE_EXHAUSTED: large thumbnails) is asked for again in halves."""
    try:
        found = _unless_gone(client, stream_id, ids)
    except _TooLarge:
        half = len(ids) // 2
        return _fetch(client, stream_id, ids[:half], gone) + _fetch(client, stream_id, ids[half:], gone)
    if found is not None:
        return found
    found = []
    for keyframe_id in ids:
        one = _unless_gone(client, stream_id, [keyframe_id])
        if one is None:
            gone.append(keyframe_id)
        else:
            found += one
    return found


def _unless_gone(client, stream_id: str, ids: list[str]) -> list | None:
    """GetKeyframes of ``ids``; None when the server holds one of them no longer (NOT_FOUND)."""
    import grpc  # here: `mosaic --help` loads this module, and grpc is slow to import

    try:
        return client.get_keyframes(stream_id, keyframe_ids=ids)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and len(ids) > 1:
            raise _TooLarge from err
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return None


class _TooLarge(Exception):
    """The keyframes asked for do not fit in one reply."""


def save_evidence_files(client, spans, directory: Path) -> int:
    """``save_evidence`` for the CLI: a line saying what was written and what is gone; 1 if a file would leave
    ``directory``."""
    try:
        written, gone = save_evidence(client, spans, directory)
    except (EvidencePathError, OSError) as err:
        print(f"error: evidence frames not saved: {err}", file=sys.stderr)
        return 1
    if not written:
        print(f"no evidence frames to save (the answer's spans name none the server holds); {directory} is unchanged")
    else:
        print(f"saved {len(written)} evidence frame{'s' if len(written) != 1 else ''} to {directory}")
    if gone:
        print(
            f"{len(gone)} evidence frame{'s' if len(gone) != 1 else ''} no longer held by the server: {', '.join(gone)}"
        )
    return 0
