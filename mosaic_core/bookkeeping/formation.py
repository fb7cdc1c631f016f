"""Online cluster formation by visual coherence, one ``ClusterFormer`` per stream.

The torch layer keeps each open cluster's running centroid. For every arriving frame it computes the cosine
similarity of the frame's vision embedding to that centroid and the cohesion the cluster would have with
the frame added (mean cosine of members to the new centroid). ``decide`` turns those numbers, plus time and
size, into join-or-start; ``commit`` records the outcome once the frame's KV has really been placed.

    frames:   f0  f1  f2 | f3  f4 | (gap > max_gap_s) f5 ...
    clusters: c000000    | c000001 | c000002
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from mosaic_core.bookkeeping.cluster_record import ClusterRecord
from mosaic_core.bookkeeping.formation_config import FormationConfig, is_int
from mosaic_core.errors import (
    InvalidArgumentError,
    StateError,
    TimestampOrderError,
    UnknownClusterError,
)

# "young" joins a frame that failed the similarity checks because the open cluster is shorter than
# min_frames_before_split; every other reason is a start of a new cluster except "similar".
FORMATION_REASONS: tuple[str, ...] = ("first", "similar", "young", "dissimilar", "incoherent", "full", "gap")


@dataclass(slots=True)
class FormationDecision:
    """Whether the frame joins the open cluster, which cluster it goes to, and why."""

    join: bool
    cluster_id: str
    reason: str


class ClusterFormer:
    """Groups one stream's frames into clusters and keeps their records in order of their first frames.

    Cluster ids are ``f"{stream_id}/c{n:06d}"`` from one counter per stream, never reused, including the ids
    of clusters made by ``merge_records``, ``join_records`` and ``split_record``. The counter starts at
    ``first_number``: past the numbers of an ended stream of the same id, so that none of its ids names one of
    this stream's clusters.
    """

    def __init__(self, stream_id: str, config: FormationConfig | None = None, *, first_number: int = 0) -> None:
        if not is_int(first_number) or first_number < 0:
            raise InvalidArgumentError(f"first_number must be an int >= 0, got {first_number!r}")
        self.stream_id = stream_id
        self.config = config if config is not None else FormationConfig()
        self._records: list[ClusterRecord] = []  # by first frame; only the last one may be open
        self._by_id: dict[str, ClusterRecord] = {}  # the same records
        self._next_number = first_number
        self._last_frame_index: int | None = None
        self._last_timestamp_s: float | None = None

    # -- per frame ----------------------------------------------------------------------------------------

    def decide(
        self, *, timestamp_s: float, num_tokens: int, similarity: float | None, cohesion_after: float | None
    ) -> FormationDecision:
        """Decide where a frame goes, without changing anything.

        Args:
            timestamp_s: the frame's time; must be later than the last committed frame's.
            num_tokens: the frame's visual tokens; at most ``config.max_tokens``.
            similarity: cosine of the frame to the open cluster's centroid; may be None only when there is no
                open cluster or the time gap or size cap already forces a new one.
            cohesion_after: the open cluster's cohesion with the frame added; None skips that check.

        Raises:
            InvalidArgumentError: bad token count, non-finite score, or a needed similarity is missing.
            TimestampOrderError: the frame is not later than the previous one.
        """
        self._check_frame(timestamp_s, num_tokens)
        for name, score in (("similarity", similarity), ("cohesion_after", cohesion_after)):
            if score is not None and not math.isfinite(score):
                raise InvalidArgumentError(f"{name} must be finite, got {score!r}")
        cfg, open_rec = self.config, self._open()
        if open_rec is None:
            return self._start("first")
        if timestamp_s - open_rec.end_s > cfg.max_gap_s:
            return self._start("gap")
        if open_rec.num_tokens + num_tokens > cfg.max_tokens:
            return self._start("full")
        if open_rec.num_frames < cfg.min_frames_before_split:
            return FormationDecision(join=True, cluster_id=open_rec.cluster_id, reason="young")
        if similarity is None:
            raise InvalidArgumentError(f"stream {self.stream_id!r}: similarity is needed to join or split")
        if similarity < cfg.min_similarity:
            return self._start("dissimilar")
        if cohesion_after is not None and cohesion_after < cfg.min_cohesion:
            return self._start("incoherent")
        return FormationDecision(join=True, cluster_id=open_rec.cluster_id, reason="similar")

    def commit(
        self, decision: FormationDecision, *, frame_index: int, timestamp_s: float, num_tokens: int
    ) -> ClusterRecord:
        """Record a frame as ``decision`` said; returns a copy of the cluster it went to.

        Raises:
            StateError: ``decision`` is stale (another frame was committed or the cluster sealed since).
            InvalidArgumentError: the frame index does not increase, or the frame no longer fits.
        """
        self._check_frame(timestamp_s, num_tokens)
        if self._last_frame_index is not None and frame_index <= self._last_frame_index:
            raise InvalidArgumentError(
                f"stream {self.stream_id!r}: frame index {frame_index} after {self._last_frame_index}"
            )
        open_rec = self._open()
        if decision.join:
            if open_rec is None or open_rec.cluster_id != decision.cluster_id:
                raise StateError(f"stale decision: cluster {decision.cluster_id!r} is not the open cluster")
            if open_rec.num_tokens + num_tokens > self.config.max_tokens:
                raise InvalidArgumentError(
                    f"{num_tokens} tokens overflow {open_rec.cluster_id!r} ({open_rec.num_tokens} of "
                    f"{self.config.max_tokens})"
                )
            record = open_rec
        else:
            if decision.cluster_id != self._peek_id():
                raise StateError(f"stale decision: next cluster is {self._peek_id()!r}, not {decision.cluster_id!r}")
            self.seal()
            record = ClusterRecord(self._take_id(), self.stream_id, [], timestamp_s, timestamp_s, 0)
            self._records.append(record)
            self._by_id[record.cluster_id] = record
        record.frame_indices.append(frame_index)
        record.frame_timestamps_s.append(timestamp_s)
        record.frame_num_tokens.append(num_tokens)
        record.end_s = timestamp_s
        record.num_tokens += num_tokens
        self._last_frame_index, self._last_timestamp_s = frame_index, timestamp_s
        return record.copy()

    def seal(self) -> ClusterRecord | None:
        """Close the open cluster (the next frame starts a new one); returns it, or None if none was open."""
        open_rec = self._open()
        if open_rec is None:
            return None
        open_rec.sealed = True
        return open_rec.copy()

    # -- queries ------------------------------------------------------------------------------------------

    def records(self) -> list[ClusterRecord]:
        """Copies of every record, in order of their first frames (the open cluster, if any, last)."""
        return [record.copy() for record in self._records]

    def records_to_read(self) -> tuple[ClusterRecord, ...]:
        """The records themselves, in the order of ``records``, for a caller that only reads them: no copies, so a
        listing of many streams' clusters after every ingest call stays cheap."""
        return tuple(self._records)

    def open_cluster(self) -> ClusterRecord | None:
        open_rec = self._open()
        return None if open_rec is None else open_rec.copy()

    def get(self, cluster_id: str) -> ClusterRecord:
        return self._records[self._position(cluster_id)].copy()

    def record_to_read(self, cluster_id: str) -> ClusterRecord | None:
        """The record itself (not a copy) for a caller that only reads it, or None if there is none by that id."""
        return self._by_id.get(cluster_id)

    def known_record_to_read(self, cluster_id: str) -> ClusterRecord:
        """``record_to_read`` for a cluster that must exist; raises ``UnknownClusterError`` if it does not."""
        record = self._by_id.get(cluster_id)
        if record is None:
            raise UnknownClusterError(f"stream {self.stream_id!r} has no cluster {cluster_id!r}")
        return record

    def newest_to_read(self, count: int) -> tuple[ClusterRecord, ...]:
        """The last ``count`` records themselves (the open cluster, if any, last), for a caller that only reads them."""
        return tuple(self._records[-count:]) if count > 0 else ()

    # -- maintenance --------------------------------------------------------------------------------------

    def merge_records(self, a: ClusterRecord, b: ClusterRecord) -> ClusterRecord:
        """Replace two temporally adjacent sealed clusters (``a`` right before ``b``) by one with a new id.

        Raises:
            UnknownClusterError: either is no longer a record of this stream.
            StateError: either is still open.
            InvalidArgumentError: not adjacent in that order, or the result exceeds ``config.max_tokens``.
        """
        pos_a, pos_b = self._sealed_position(a.cluster_id), self._sealed_position(b.cluster_id)
        if pos_b != pos_a + 1:
            raise InvalidArgumentError(f"cannot merge {a.cluster_id!r} and {b.cluster_id!r}: not adjacent in order")
        left, right = self._records[pos_a], self._records[pos_b]
        num_tokens = left.num_tokens + right.num_tokens
        if num_tokens > self.config.max_tokens:
            raise InvalidArgumentError(
                f"merging {a.cluster_id!r} and {b.cluster_id!r} gives {num_tokens} tokens,"
                f" over max_tokens={self.config.max_tokens}"
            )
        merged = ClusterRecord(
            cluster_id=self._take_id(),
            stream_id=self.stream_id,
            frame_indices=left.frame_indices + right.frame_indices,
            start_s=left.start_s,
            end_s=right.end_s,
            num_tokens=num_tokens,
            sealed=True,
            frame_timestamps_s=left.frame_timestamps_s + right.frame_timestamps_s,
            frame_num_tokens=left.frame_num_tokens + right.frame_num_tokens,
        )
        self._records[pos_a : pos_b + 1] = [merged]
        self._replace_ids((left, right), (merged,))
        return merged.copy()

    def join_records(self, earlier: ClusterRecord, later: ClusterRecord) -> ClusterRecord:
        """Replace two sealed clusters, every frame of ``earlier`` before every frame of ``later`` but not
        necessarily adjacent (a scene that recurs), by one with a new id, placed where ``earlier`` was.

        The joined record lists ``earlier``'s frames, then ``later``'s: the order its KV must be stored in.

        Raises:
            UnknownClusterError: either is no longer a record of this stream.
            StateError: either is still open.
            InvalidArgumentError: the frames are not in that order, or the result exceeds ``config.max_tokens``.
        """
        pos_a, pos_b = self._sealed_position(earlier.cluster_id), self._sealed_position(later.cluster_id)
        first, second = self._records[pos_a], self._records[pos_b]
        if pos_a == pos_b or max(first.frame_indices) >= min(second.frame_indices):
            raise InvalidArgumentError(
                f"cannot join {earlier.cluster_id!r} and {later.cluster_id!r}: the first's frames must all come first"
            )
        num_tokens = first.num_tokens + second.num_tokens
        if num_tokens > self.config.max_tokens:
            raise InvalidArgumentError(
                f"joining {earlier.cluster_id!r} and {later.cluster_id!r} gives {num_tokens} tokens,"
                f" over max_tokens={self.config.max_tokens}"
            )
        joined = ClusterRecord(
            cluster_id=self._take_id(),
            stream_id=self.stream_id,
            frame_indices=first.frame_indices + second.frame_indices,
            start_s=first.start_s,
            end_s=second.end_s,
            num_tokens=num_tokens,
            sealed=True,
            frame_timestamps_s=first.frame_timestamps_s + second.frame_timestamps_s,
            frame_num_tokens=first.frame_num_tokens + second.frame_num_tokens,
        )
        self._records[pos_a] = joined
        del self._records[pos_b]
        self._replace_ids((first, second), (joined,))
        return joined.copy()

    def split_record(self, rec: ClusterRecord, at_frame_index: int) -> tuple[ClusterRecord, ClusterRecord]:
        """Replace a sealed cluster by two: frames before ``at_frame_index``, and from it on; new ids.

        Raises:
            UnknownClusterError: the cluster is no longer a record of this stream.
            StateError: the cluster is open, or its record lacks per-frame times and sizes.
            InvalidArgumentError: ``at_frame_index`` is not one of its frames, or is its first frame.
        """
        pos = self._sealed_position(rec.cluster_id)
        whole = self._records[pos]
        if len(whole.frame_timestamps_s) != whole.num_frames or len(whole.frame_num_tokens) != whole.num_frames:
            raise StateError(f"cluster {rec.cluster_id!r} has no per-frame times and sizes to split by")
        if at_frame_index not in whole.frame_indices[1:]:
            raise InvalidArgumentError(
                f"cannot split {rec.cluster_id!r} at frame {at_frame_index}: frames {whole.frame_indices}"
            )
        cut = whole.frame_indices.index(at_frame_index)
        halves = tuple(
            ClusterRecord(
                cluster_id=self._take_id(),
                stream_id=self.stream_id,
                frame_indices=whole.frame_indices[part],
                start_s=whole.frame_timestamps_s[part][0],
                end_s=whole.frame_timestamps_s[part][-1],
                num_tokens=sum(whole.frame_num_tokens[part]),
                sealed=True,
                frame_timestamps_s=whole.frame_timestamps_s[part],
                frame_num_tokens=whole.frame_num_tokens[part],
            )
            for part in (slice(None, cut), slice(cut, None))
        )
        self._records[pos : pos + 1] = list(halves)
        self._replace_ids((whole,), halves)
        return halves[0].copy(), halves[1].copy()

    def adopt(
        self,
        records: list[ClusterRecord],
        *,
        next_number: int,
        last_frame_index: int | None,
        last_timestamp_s: float | None,
    ) -> None:
        """Takes back a restarted stream's sealed clusters (in order of their first frames) and continues after
        them: ids from ``next_number`` on, frames after ``last_frame_index`` and ``last_timestamp_s``.

        Raises:
            StateError: the stream already has clusters.
            InvalidArgumentError: a record is open, out of start order, shares a frame with another, or is
                numbered at or past ``next_number``. (Joined clusters span the clusters between their visits, so
                records are ordered by start, and they may overlap in time but never share a frame.)
        """
        if self._records:
            raise StateError(f"stream {self.stream_id!r} already has clusters; adopt only into a new former")
        previous_start = float("-inf")
        seen: set[int] = set()
        for record in records:
            number = int(record.cluster_id.rsplit("/c", 1)[1])
            frames = set(record.frame_indices)
            if not record.sealed or record.start_s < previous_start or frames & seen or number >= next_number:
                raise InvalidArgumentError(
                    f"cannot adopt {record.cluster_id!r}: it must be sealed, start after the cluster before it, "
                    f"share no frame with another and be numbered below {next_number}"
                )
            previous_start = record.start_s
            seen |= frames
        self._records = [record.copy() for record in records]
        self._by_id = {record.cluster_id: record for record in self._records}
        self._next_number = next_number
        self._last_frame_index = last_frame_index
        self._last_timestamp_s = last_timestamp_s

    def rewind_to_sealed(self) -> float | None:
        """Takes the time a next frame must come after back to the newest frame of the records (None: there is no
        record), for a restored stream whose frames after it were lost and come again at the times they had; frame
        indices go on as they were. Returns that time.

        Raises:
            StateError: a cluster is open (a frame came since the restore).
        """
        if self._open() is not None:
            raise StateError(f"stream {self.stream_id!r} has an open cluster; only a restored stream rewinds")
        self._last_timestamp_s = max((record.end_s for record in self._records), default=None)
        return self._last_timestamp_s

    @property
    def next_number(self) -> int:
        """The number the next new cluster will get."""
        return self._next_number

    def ids_numbered(self, numbers: range) -> list[str]:
        """The cluster ids this former gives (or gave) the clusters ``numbers``, in order."""
        return [self._id_of(n) for n in numbers]

    def remove(self, cluster_id: str) -> ClusterRecord:
        """Forget a sealed cluster (retention dropped it); returns its last record."""
        record = self._records.pop(self._sealed_position(cluster_id))
        del self._by_id[cluster_id]
        return record

    # -- internals ----------------------------------------------------------------------------------------

    def _open(self) -> ClusterRecord | None:
        if self._records and not self._records[-1].sealed:
            return self._records[-1]
        return None

    def _id_of(self, number: int) -> str:
        return f"{self.stream_id}/c{number:06d}"

    def _peek_id(self) -> str:
        return self._id_of(self._next_number)

    def _take_id(self) -> str:
        cluster_id = self._peek_id()
        self._next_number += 1
        return cluster_id

    def _start(self, reason: str) -> FormationDecision:
        return FormationDecision(join=False, cluster_id=self._peek_id(), reason=reason)

    def _replace_ids(self, old: tuple[ClusterRecord, ...], new: tuple[ClusterRecord, ...]) -> None:
        for record in old:
            del self._by_id[record.cluster_id]
        for record in new:
            self._by_id[record.cluster_id] = record

    def _position(self, cluster_id: str) -> int:
        record = self.known_record_to_read(cluster_id)
        # Records are in order of their first frames, which no two share, so a search finds it; the scan keeps a
        # lookup right were that order ever broken.
        pos = bisect.bisect_left(self._records, _first_frame(record), key=_first_frame)
        if pos < len(self._records) and self._records[pos] is record:
            return pos
        return next(i for i, r in enumerate(self._records) if r is record)

    def _sealed_position(self, cluster_id: str) -> int:
        pos = self._position(cluster_id)
        if not self._records[pos].sealed:
            raise StateError(f"cluster {cluster_id!r} is still open; seal it first")
        return pos

    def _check_frame(self, timestamp_s: float, num_tokens: int) -> None:
        if not is_int(num_tokens) or not 0 < num_tokens <= self.config.max_tokens:
            raise InvalidArgumentError(
                f"a frame needs 1..{self.config.max_tokens} tokens (max_tokens), got {num_tokens!r}"
            )
        if not math.isfinite(timestamp_s):
            raise InvalidArgumentError(f"timestamp_s must be finite, got {timestamp_s!r}")
        if self._last_timestamp_s is not None and timestamp_s <= self._last_timestamp_s:
            raise TimestampOrderError(
                f"stream {self.stream_id!r}: frame at {timestamp_s}s is not after {self._last_timestamp_s}s"
            )


def _first_frame(record: ClusterRecord) -> int:
    return record.frame_indices[0]
