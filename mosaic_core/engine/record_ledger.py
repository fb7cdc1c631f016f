"""The bytes of one engine's sealed-cluster records on disk, and which of them are oldest.

``HistoryKeeper`` enters a record when it queues its seal (or adopts it at a restart) and takes it out when the
cluster is merged away, split, dropped by retention or by the history budget, or its stream is closed. The engine
keeps ``history_budget_bytes`` with it: past the budget, the records sealed first go, across the streams.

Age is wall-clock time, when the record's video was sealed, not a stream's clock: a pushed camera's clock is Unix
time and a pulled one's starts at 0, so their clocks say nothing about which video is older. A merged cluster is as
old as the oldest it holds, and a split one as the cluster it came from; after a restart, a record is as old as its
file.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

STALE_ITEMS_KEPT = 64  # items of removed records the heap may hold beyond twice the live ones before it is rebuilt


@dataclass(slots=True, frozen=True)
class _Entry:
    stream_id: str
    sealed_unix_s: float
    num_bytes: int


class RecordLedger:
    """Record bytes by cluster, their total, and the clusters by seal time (a heap; stale items are skipped)."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._by_age: list[tuple[float, str]] = []
        self.total_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, cluster_id: object) -> bool:
        return cluster_id in self._entries

    def sealed_unix_s(self, cluster_id: str) -> float | None:
        entry = self._entries.get(cluster_id)
        return None if entry is None else entry.sealed_unix_s

    def add(self, stream_id: str, cluster_id: str, *, sealed_unix_s: float, num_bytes: int) -> None:
        """Enters a cluster's record (replacing the one it had: a record rewritten under its id)."""
        self.remove([cluster_id])
        self._entries[cluster_id] = _Entry(stream_id, sealed_unix_s, num_bytes)
        self.total_bytes += num_bytes
        heapq.heappush(self._by_age, (sealed_unix_s, cluster_id))

    def remove(self, cluster_ids) -> None:
        for cluster_id in cluster_ids:
            entry = self._entries.pop(cluster_id, None)
            if entry is not None:
                self.total_bytes -= entry.num_bytes
        if len(self._by_age) > 2 * len(self._entries) + STALE_ITEMS_KEPT:  # rebuilt: the heap stays bounded
            self._by_age = [(entry.sealed_unix_s, cluster_id) for cluster_id, entry in self._entries.items()]
            heapq.heapify(self._by_age)

    def forget_stream(self, stream_id: str) -> None:
        self.remove([cid for cid, entry in self._entries.items() if entry.stream_id == stream_id])

    def oldest_over(self, limit_bytes: int, can_drop: Callable[[str, str], bool]) -> list[tuple[str, str]]:
        """The ``(stream_id, cluster_id)`` pairs, oldest first, whose removal brings the total to ``limit_bytes``
        or under, passing over those ``can_drop(stream_id, cluster_id)`` refuses (they stay entered). Takes nothing
        out: the caller removes what it drops. May return fewer when too many are refused."""
        excess = self.total_bytes - limit_bytes
        chosen, popped, seen = [], [], set()
        while excess > 0 and self._by_age:
            sealed_unix_s, cluster_id = heapq.heappop(self._by_age)
            entry = self._entries.get(cluster_id)
            if entry is None or entry.sealed_unix_s != sealed_unix_s or cluster_id in seen:  # stale or a twin
                continue
            seen.add(cluster_id)
            popped.append((sealed_unix_s, cluster_id))  # all go back: a chosen one is skipped there once removed
            if can_drop(entry.stream_id, cluster_id):
                chosen.append((entry.stream_id, cluster_id))
                excess -= entry.num_bytes
        for item in popped:
            heapq.heappush(self._by_age, item)
        return chosen
