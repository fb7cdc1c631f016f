"""One stream's keyframes: the forming cluster's picker, and the JPEGs of every held cluster.

    frame joins c7 ----> picker(c7).offer          c7 seals ----> encode, charge host (+ disk) bytes, keep
    c7 + c8 merged ----> carry_over(c7, c8 -> c9)  c7 dropped --> forget (bytes given back)
    GetKeyframes ------> by ids, by cluster, or the newest (the forming cluster's candidates included)

A held cluster's keyframes are charged to the host budget (they stay in memory: a thumbnail never costs a disk
read) and, when history is written to disk, to the disk budget too (they are part of the cluster's record file).
When the host tier cannot make room, the cluster keeps no keyframes and ``num_dropped`` counts them.

With an ``encoder`` (``EngineConfig.keyframe_encode_threads``) a sealed cluster's JPEGs are encoded on that
thread pool, not on the engine thread that seals it. Pillow's encoder lets go of the GIL, so the engine thread goes
on queuing GPU work meanwhile. The cluster keeps its keyframes, and is charged for them, on the engine thread: at
the next frame offered once the encoding is done, or at the first read, charge, merge or drop that needs them,
which waits for it. So every read sees what inline encoding would have given. A stream's clusters waiting for the
encoder are bounded (``MAX_ENCODING``): past it, a seal waits for the oldest, so an encoder slower than the seals
holds ingest back rather than piling thumbnails up.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future

import numpy as np

from mosaic_core.bookkeeping.cluster_record import ClusterRecord
from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.engine.keyframes import Keyframe, KeyframePicker, make_keyframe_id, parse_keyframe_id
from mosaic_core.engine.stream import StreamState
from mosaic_core.engine.tiering import TierManager
from mosaic_core.errors import InvalidArgumentError, UnknownClusterError, shown

MAX_IDS_PER_LOOKUP = 64
MAX_ENCODING = 8  # a stream's sealed clusters whose JPEGs may wait for the encoder at once


class UnknownKeyframeError(UnknownClusterError):
    """No keyframe with that id is held (never kept, or its cluster was dropped or deleted)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyframeSettings:
    count: int
    long_side_px: int
    jpeg_quality: int
    on_disk: bool  # keyframes are written with the cluster records, so they count in the disk budget too
    encoder: Executor | None = None  # encodes sealed clusters' JPEGs off the sealing thread; None: inline


class KeyframeStore:
    """Keyframes of one stream's clusters, charged to the tier budgets of ``tiering``."""

    def __init__(self, stream_id: str, settings: KeyframeSettings, tiering: TierManager) -> None:
        self.stream_id = stream_id
        self.settings = settings
        self.tiering = tiering
        self.picker: KeyframePicker | None = None
        self._held: dict[str, list[Keyframe]] = {}  # cluster id -> keyframes in time order
        self._by_frame: dict[int, Keyframe] = {}
        self._num_bytes = 0  # of the keyframes in _by_frame: engine stats read it twice a second
        self._num_dropped = 0
        self._encoding: dict[str, Future[list[Keyframe]]] = {}  # sealed clusters whose JPEGs are being encoded

    # -- forming ----------------------------------------------------------------------------------------------
    def offer(
        self,
        cluster_id: str,
        frame_index: int,
        timestamp_s: float,
        small_of: Callable[[], np.ndarray],
        similarity: float | None,
    ) -> None:
        """Frame ``frame_index`` joined ``cluster_id`` (a new cluster seals the forming one first); ``small_of()``
        gives its thumbnail (``mosaic_core.engine.thumbnails``), asked only if the frame is kept."""
        if self.settings.count == 0:
            return
        if self._encoding:
            self._keep_encoded(wait=False)
        if self.picker is not None and self.picker.cluster_id != cluster_id:
            self.seal()
        if self.picker is None:
            self.picker = KeyframePicker(cluster_id, self.settings.count)
        self.picker.offer(frame_index, timestamp_s, small_of, similarity)

    def seal(self) -> None:
        """The forming cluster sealed: its candidates become its keyframes."""
        picker, self.picker = self.picker, None
        if picker is None:
            return
        if self.settings.encoder is None:
            self.keep(picker.cluster_id, picker.encode(self.stream_id, self.settings.jpeg_quality))
        else:  # the picker is the pool's alone from here: nothing else holds it
            if len(self._encoding) >= MAX_ENCODING:
                self._keep_oldest_encoded()
            self._encoding[picker.cluster_id] = self.settings.encoder.submit(
                picker.encode, self.stream_id, self.settings.jpeg_quality
            )

    def _keep_oldest_encoded(self) -> None:
        cluster_id, encoding = next(iter(self._encoding.items()))
        del self._encoding[cluster_id]
        self._hold(cluster_id, encoding.result())

    def _keep_encoded(self, *, wait: bool) -> None:
        """Keeps the clusters whose JPEGs are encoded (all of them, waiting for each, with ``wait``), in the order
        they sealed."""
        for cluster_id, encoding in list(self._encoding.items()):
            if not (wait or encoding.done()):
                break  # a later one may be done, but clusters are kept in the order they sealed
            del self._encoding[cluster_id]
            self._hold(cluster_id, encoding.result())

    # -- held clusters ----------------------------------------------------------------------------------------
    def keep(self, cluster_id: str, keyframes: list[Keyframe], *, restored: bool = False) -> bool:
        """Holds a cluster's keyframes if the budgets take their bytes; False (counted as dropped) otherwise.
        ``restored``: read back from the cluster's record at a restart, already on disk, so charged to the disk
        tier even past its budget, as their cluster is."""
        self._keep_encoded(wait=True)  # the clusters sealed before it are charged first, as inline encoding did
        return self._hold(cluster_id, keyframes, restored=restored)

    def _hold(self, cluster_id: str, keyframes: list[Keyframe], *, restored: bool = False) -> bool:
        if not keyframes:
            return True
        num_bytes = sum(k.num_bytes for k in keyframes)
        if not self._charge(cluster_id, num_bytes, restored=restored):
            self._num_dropped += len(keyframes)
            return False
        self._held[cluster_id] = sorted(keyframes, key=lambda k: k.frame_index)
        for keyframe in keyframes:
            self._drop_frame(keyframe.frame_index)
            self._by_frame[keyframe.frame_index] = keyframe
            self._num_bytes += keyframe.num_bytes
        return True

    def carry_over(self, old_ids: list[str], new_records: list[ClusterRecord]) -> None:
        """Clusters ``old_ids`` became ``new_records`` (a merge, a recurring-scene join, a split): each keyframe
        goes to the new cluster holding its frame, keeping its id."""
        self._keep_encoded(wait=True)
        keyframes = [k for cid in old_ids for k in self._held.get(cid, [])]
        self.forget(old_ids)
        for record in new_records:
            frames = set(record.frame_indices)
            mine = [dataclasses.replace(k, cluster_id=record.cluster_id) for k in keyframes if k.frame_index in frames]
            self._hold(record.cluster_id, mine)

    def forget(self, cluster_ids: list[str]) -> None:
        """Drops the clusters' keyframes and gives their bytes back (retention, merges, stream deletion)."""
        self._keep_encoded(wait=True)
        residency = self.tiering.residency
        for cluster_id in cluster_ids:
            for keyframe in self._held.pop(cluster_id, []):
                self._drop_frame(keyframe.frame_index)
            residency.discharge(_owner(cluster_id), Tier.HOST)
            residency.discharge(_owner(cluster_id), Tier.DISK)

    def close(self) -> None:
        self.picker = None
        self._keep_encoded(wait=True)
        self.forget(list(self._held))

    @property
    def num_bytes(self) -> int:
        self._keep_encoded(wait=True)
        return self._num_bytes

    @property
    def num_dropped(self) -> int:
        self._keep_encoded(wait=True)
        return self._num_dropped

    def _drop_frame(self, frame_index: int) -> None:
        dropped = self._by_frame.pop(frame_index, None)
        if dropped is not None:
            self._num_bytes -= dropped.num_bytes

    @property
    def num_keyframes(self) -> int:
        self._keep_encoded(wait=True)
        return len(self._by_frame)

    # -- reading ----------------------------------------------------------------------------------------------
    def of_cluster(self, cluster_id: str) -> list[Keyframe]:
        """A held cluster's keyframes in time order; a forming cluster's current candidates (they may change
        until it seals)."""
        if self.picker is not None and self.picker.cluster_id == cluster_id:
            return self.picker.encode(self.stream_id, self.settings.jpeg_quality)
        self._keep_encoded(wait=True)
        return list(self._held.get(cluster_id, []))

    def ids_in(self, cluster_id: str, start_s: float, end_s: float) -> list[str]:
        """Ids of the cluster's keyframes (a forming cluster's candidates) taken within ``[start_s, end_s]``."""
        if self.picker is not None and self.picker.cluster_id == cluster_id:
            frames = [(c.frame_index, c.timestamp_s) for c in self.picker.candidates()]
        else:
            self._keep_encoded(wait=True)
            frames = [(k.frame_index, k.timestamp_s) for k in self._held.get(cluster_id, [])]
        return [make_keyframe_id(self.stream_id, i) for i, t in frames if start_s <= t <= end_s]

    def latest(self) -> list[Keyframe]:
        """The newest keyframe (the forming cluster's included), or none before the first."""
        candidates = self.of_cluster(self.picker.cluster_id) if self.picker is not None else []
        self._keep_encoded(wait=True)
        newest_held = max(self._by_frame, default=None)
        if newest_held is not None:
            candidates.append(self._by_frame[newest_held])
        return sorted(candidates, key=lambda k: k.frame_index)[-1:]

    def by_ids(self, keyframe_ids: list[str]) -> list[Keyframe]:
        """The keyframes named, in that order.

        Raises:
            InvalidArgumentError: too many ids, or an id that is not one of this stream's keyframe ids.
            UnknownKeyframeError: an id that names no held keyframe.
        """
        if len(keyframe_ids) > MAX_IDS_PER_LOOKUP:
            raise InvalidArgumentError(
                f"{len(keyframe_ids)} keyframe ids asked for; at most {MAX_IDS_PER_LOOKUP} fit in one call"
            )
        self._keep_encoded(wait=True)
        found = []
        forming = None
        for keyframe_id in keyframe_ids:
            parsed = parse_keyframe_id(keyframe_id)
            if parsed is None or parsed[0] != self.stream_id:
                raise InvalidArgumentError(
                    f"{shown(keyframe_id)} is not a keyframe id of stream {self.stream_id!r} (they look like "
                    f"'{self.stream_id}/f123', as EvidenceSpan.keyframe_ids gives them)"
                )
            keyframe = self._by_frame.get(parsed[1])
            if keyframe is None and self.picker is not None:
                forming = forming if forming is not None else self.of_cluster(self.picker.cluster_id)
                keyframe = next((k for k in forming if k.frame_index == parsed[1]), None)
            if keyframe is None:
                raise UnknownKeyframeError(
                    f"stream {self.stream_id!r} holds no keyframe {shown(keyframe_id)}: it was never kept, its "
                    "cluster was dropped by retention, or it was a keyframe of an earlier stream of that id, "
                    "deleted since"
                )
            found.append(keyframe)
        return found

    # -- budgets ----------------------------------------------------------------------------------------------
    def _charge(self, cluster_id: str, num_bytes: int, *, restored: bool = False) -> bool:
        residency, owner = self.tiering.residency, _owner(cluster_id)
        if not residency.charge(owner, Tier.HOST, num_bytes):
            plan = residency.plan_make_room(Tier.HOST, num_bytes)
            if plan is None:
                return False
            self.tiering.execute(plan)
            if not residency.charge(owner, Tier.HOST, num_bytes):
                return False
        if self.settings.on_disk and not residency.charge(owner, Tier.DISK, num_bytes, past_budget=restored):
            residency.discharge(owner, Tier.HOST)
            return False
        return True


def _owner(cluster_id: str) -> str:
    return f"keyframes:{cluster_id}"


# StreamState belongs to the engine's stream module; its keyframes live beside it, for as long as it does.
_STORES: weakref.WeakKeyDictionary[StreamState, KeyframeStore] = weakref.WeakKeyDictionary()


def keyframes_of(state: StreamState, settings: KeyframeSettings, tiering: TierManager) -> KeyframeStore:
    store = _STORES.get(state)
    if store is None:
        store = _STORES[state] = KeyframeStore(state.stream_id, settings, tiering)
    return store


def held_keyframes(state: StreamState) -> KeyframeStore | None:
    """The stream's store if it has one (no keyframe was ever offered or restored otherwise)."""
    return _STORES.get(state)


def store_for(parts, state: StreamState) -> KeyframeStore:
    """The stream's store, made on first use from the engine's ``EngineParts`` (``parts``: its keyframe settings
    and tiers; not imported here, since the engine's parts import this module's callers)."""
    return keyframes_of(state, parts.keyframes, parts.tiering)
