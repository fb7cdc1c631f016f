"""Keyframes: a few JPEG thumbnails per cluster, so an answer's evidence can be looked at.

While a cluster forms, a ``KeyframePicker`` keeps small downscaled copies (never the full frame) of at most
``count`` candidates (made on the device for a whole ingest call: ``mosaic_core.engine.thumbnails``); when the
cluster seals they are JPEG-encoded and kept with the cluster:

    frames of c7:   f40  f41  f42  f43  f44 (seal)
    candidates:     first=f40, central=f42 (most similar to the running centroid when it joined), last=f44
    keyframes:      cam/f40 cam/f42 cam/f44   (ids name the stream's frame, so merges and splits keep them)

With ``count`` k: 1 keeps the most central frame; 2 the first and last; k >= 3 the first, the last and the
k - 2 most central. "Central" is the frame's cosine to the open cluster's centroid at the moment it joined (the
number formation already computes), so no frame has to wait for the final centroid.

Memory per stream: the open cluster's candidates (k small arrays) plus the JPEGs of its held clusters, which
``KeyframeStore`` charges to the host budget (and to the disk budget when they are written with the records).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

KEYFRAME_ID_PATTERN = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,127})/f([0-9]{1,12})")


@dataclass(slots=True)
class Keyframe:
    """One kept frame of a cluster, as a JPEG thumbnail."""

    keyframe_id: str
    stream_id: str
    cluster_id: str
    frame_index: int
    timestamp_s: float
    jpeg: bytes
    width: int
    height: int

    @property
    def num_bytes(self) -> int:
        return len(self.jpeg)


def make_keyframe_id(stream_id: str, frame_index: int) -> str:
    return f"{stream_id}/f{frame_index}"


def parse_keyframe_id(keyframe_id: str) -> tuple[str, int] | None:
    """``(stream_id, frame_index)`` of a well-formed id, else None. Ids are parsed, never used as paths."""
    match = KEYFRAME_ID_PATTERN.fullmatch(keyframe_id) if isinstance(keyframe_id, str) else None
    return None if match is None else (match.group(1), int(match.group(2)))


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=quality)
    return out.getvalue()


@dataclass(slots=True)
class _Candidate:
    frame_index: int
    timestamp_s: float
    small: np.ndarray  # [h, w, 3] uint8 thumbnail, not yet encoded
    centrality: float  # cosine to the running centroid when the frame joined; the first frame has none (-inf)


@dataclass(slots=True)
class KeyframePicker:
    """The candidates of one forming cluster: at most ``count`` thumbnails at any time."""

    cluster_id: str
    count: int
    first: _Candidate | None = None
    last: _Candidate | None = None
    central: list[_Candidate] = field(default_factory=list)  # best first
    # Candidates already encoded (a camera tile polling the newest frame asks again and again), by frame index;
    # only current candidates stay, so at most ``count`` JPEGs.
    _encoded: dict[int, Keyframe] = field(default_factory=dict)

    def offer(self, frame_index: int, timestamp_s: float, small_of, similarity: float | None) -> None:
        """A frame joined the cluster; ``small_of()`` makes its thumbnail, called only if the frame is kept."""
        centrality = float("-inf") if similarity is None else float(similarity)
        num_central = 1 if self.count == 1 else max(0, self.count - 2)
        keeps_ends = self.count >= 2
        if keeps_ends and self.first is None:
            self.first = _Candidate(frame_index, timestamp_s, small_of(), centrality)
            return
        worst = self.central[-1].centrality if self.central and len(self.central) >= num_central else None
        is_central = num_central > 0 and (worst is None or centrality > worst)
        if not (keeps_ends or is_central):
            return
        candidate = _Candidate(frame_index, timestamp_s, small_of(), centrality)
        if keeps_ends:
            previous, self.last = self.last, candidate
            candidate = previous  # the frame that was last until now may still be central
        if candidate is not None and num_central > 0 and (worst is None or candidate.centrality > worst):
            self.central.append(candidate)
            self.central.sort(key=lambda c: -c.centrality)
            del self.central[num_central:]

    def candidates(self) -> list[_Candidate]:
        """The kept frames, in time order."""
        chosen = [c for c in (self.first, *self.central, self.last) if c is not None]
        return sorted({c.frame_index: c for c in chosen}.values(), key=lambda c: c.frame_index)

    def encode(self, stream_id: str, quality: int) -> list[Keyframe]:
        """The candidates as keyframes, in time order; each candidate is encoded once."""
        candidates = self.candidates()
        self._encoded = {c.frame_index: self._encoded.get(c.frame_index) for c in candidates}
        for c in candidates:
            if self._encoded[c.frame_index] is None:
                self._encoded[c.frame_index] = Keyframe(
                    keyframe_id=make_keyframe_id(stream_id, c.frame_index),
                    stream_id=stream_id,
                    cluster_id=self.cluster_id,
                    frame_index=c.frame_index,
                    timestamp_s=c.timestamp_s,
                    jpeg=encode_jpeg(c.small, quality),
                    width=c.small.shape[1],
                    height=c.small.shape[0],
                )
        return list(self._encoded.values())
