"""When a frame joins the open cluster (``FormationConfig``), checked once as it is made.

``ClusterFormer`` (``mosaic_core.bookkeeping.formation``) applies it frame by frame.
"""

from __future__ import annotations

from dataclasses import dataclass

from mosaic_core.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class FormationConfig:
    """When a frame joins the open cluster.

    Attributes:
        min_similarity: lowest cosine of a frame to the open cluster's centroid that still joins.
        min_cohesion: lowest cohesion the cluster may have after the frame joins.
        max_tokens: size cap of one cluster, in visual tokens.
        max_gap_s: a frame later than this after the cluster's last frame starts a new cluster.
        min_frames_before_split: a cluster with fewer frames takes the next frame even if it is dissimilar.
        join_min_similarity: recurring-scene joins. When a sealed cluster is complete, it joins the earlier held
            cluster of its stream whose vision centroid is the most similar, if that cosine is at least this and
            the two fit in ``max_tokens``; its evidence is then a list of spans. None (the default) never joins.
        join_max_candidates: how many of the newest earlier clusters a completed cluster is compared with.
        split_min_questions: splits by uneven attention (``mosaic_core.engine.splits``). Once this many questions
            retrieved a cluster, it is cut where its two parts' attention densities differ the most, if their ratio
            reaches ``split_min_density_ratio``. None (the default) never splits.
        split_min_density_ratio: how much denser (attention mass per token) one part must be than the other.
        key_weight: how much a frame's keys, not only its picture, decide whether it joins the open cluster.
            Formation then compares vectors whose cosine, for two frames, is (1 - key_weight) x their vision cosine
            + key_weight x the cosine of their mean keys at the choosing layer (``mosaic_core.engine.ingest``);
            ``min_similarity`` and ``min_cohesion`` apply to those vectors. 0 (the default) is vision only.
    """

    min_similarity: float = 0.85
    min_cohesion: float = 0.8
    max_tokens: int = 2048
    max_gap_s: float = 5.0
    min_frames_before_split: int = 1
    join_min_similarity: float | None = None
    join_max_candidates: int = 64
    split_min_questions: int | None = None
    split_min_density_ratio: float = 4.0
    key_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("min_similarity", "min_cohesion"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and -1.0 <= value <= 1.0):
                raise ConfigError(f"FormationConfig.{name} must be a cosine in [-1, 1], got {value!r}")
        if not is_int(self.max_tokens) or self.max_tokens <= 0:
            raise ConfigError(f"FormationConfig.max_tokens must be an int > 0, got {self.max_tokens!r}")
        if not (isinstance(self.max_gap_s, int | float) and self.max_gap_s > 0):
            raise ConfigError(f"FormationConfig.max_gap_s must be > 0, got {self.max_gap_s!r}")
        if not is_int(self.min_frames_before_split) or self.min_frames_before_split < 1:
            value = self.min_frames_before_split
            raise ConfigError(f"FormationConfig.min_frames_before_split must be an int >= 1, got {value!r}")
        join = self.join_min_similarity
        if join is not None and not (isinstance(join, int | float) and -1.0 <= join <= 1.0):
            raise ConfigError(f"FormationConfig.join_min_similarity must be None or a cosine in [-1, 1], got {join!r}")
        if not is_int(self.join_max_candidates) or self.join_max_candidates < 1:
            value = self.join_max_candidates
            raise ConfigError(f"FormationConfig.join_max_candidates must be an int >= 1, got {value!r}")
        split = self.split_min_questions
        if split is not None and (not is_int(split) or split < 1):
            raise ConfigError(f"FormationConfig.split_min_questions must be None or an int >= 1, got {split!r}")
        if not (isinstance(self.key_weight, int | float) and 0.0 <= self.key_weight <= 1.0):
            raise ConfigError(f"FormationConfig.key_weight must be in [0, 1], got {self.key_weight!r}")
        ratio = self.split_min_density_ratio
        if not (isinstance(ratio, int | float) and ratio > 1.0):
            raise ConfigError(f"FormationConfig.split_min_density_ratio must be > 1, got {ratio!r}")


def is_int(value: object) -> bool:
    """An int that is not a bool: the counts of a config and of a former."""
    return isinstance(value, int) and not isinstance(value, bool)
