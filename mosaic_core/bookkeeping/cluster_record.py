"""One cluster's record (``ClusterRecord``): its frames and time span, as ``ClusterFormer`` keeps it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(slots=True)
class ClusterRecord:
    """One cluster's frames and time span. ``frame_*`` lists run parallel to ``frame_indices``."""

    cluster_id: str
    stream_id: str
    frame_indices: list[int]
    start_s: float
    end_s: float
    num_tokens: int
    sealed: bool = False
    frame_timestamps_s: list[float] = field(default_factory=list)
    frame_num_tokens: list[int] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def completed_by(self, frame_index: int) -> bool:
        """Whether storing frame ``frame_index`` completed this cluster: it is sealed and that was its last frame."""
        return self.sealed and frame_index == self.frame_indices[-1]

    def spans(self) -> list[tuple[float, float]]:
        """``(start_s, end_s)`` of each run of consecutive frames, earliest first: one span, unless recurring-scene
        joins made the cluster out of several visits to the scene."""
        runs: list[tuple[int, float, float]] = []  # (last frame of the run, start_s, end_s)
        for frame, timestamp_s in sorted(zip(self.frame_indices, self.frame_timestamps_s, strict=True)):
            if runs and frame == runs[-1][0] + 1:
                runs[-1] = (frame, runs[-1][1], timestamp_s)
            else:
                runs.append((frame, timestamp_s, timestamp_s))
        return [(start_s, end_s) for _, start_s, end_s in runs] or [(self.start_s, self.end_s)]

    def copy(self) -> ClusterRecord:
        return dataclasses.replace(
            self,
            frame_indices=list(self.frame_indices),
            frame_timestamps_s=list(self.frame_timestamps_s),
            frame_num_tokens=list(self.frame_num_tokens),
        )
