"""Eviction policies: small strategy objects that rank clusters coldest-first.

A policy only keeps per-cluster access state and turns it into a priority (lower = evict first). It knows
nothing about tiers or bytes; the residency manager hands it the candidates of one tier and takes victims
from the front until enough bytes are free.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from mosaic_core.errors import ConfigError, UnknownClusterError, UnknownPolicyError


@runtime_checkable
class EvictionPolicy(Protocol):
    """What the residency manager needs from an eviction policy."""

    name: str

    def on_add(self, cluster_id: str, now_s: float) -> None:
        """Start tracking a new cluster (it counts as just touched)."""
        ...

    def on_touch(self, cluster_id: str, now_s: float, retrieved: bool) -> None:
        """Record an access; ``retrieved`` is True when a question's retrieval picked the cluster."""
        ...

    def on_remove(self, cluster_id: str) -> None:
        """Stop tracking a cluster."""
        ...

    def priority(self, cluster_id: str, now_s: float) -> tuple[float, int]:
        """Eviction priority: lower is evicted first."""
        ...

    def victims(self, candidates: Iterable[str], now_s: float) -> Iterator[str]:
        """Yield ``candidates`` coldest first (lazily, so callers can stop early)."""
        ...


def _now(now_s: float | None) -> float:
    return time.monotonic() if now_s is None else now_s


def _lazy_sorted(candidates: Iterable[str], key: Callable[[str], tuple[float, int]]) -> Iterator[str]:
    # Heapify is O(k) and each pop O(log k): a caller that needs only the few coldest of a large tier
    # never pays for a full sort.
    heap = [(key(cluster_id), cluster_id) for cluster_id in candidates]
    heapq.heapify(heap)
    while heap:
        yield heapq.heappop(heap)[1]


class LruPolicy:
    """Least recently touched first.

    Each touch stamps the cluster with the next value of a counter, so a touch is O(1) and ties cannot
    happen, whatever the clock says.
    """

    name = "lru"

    def __init__(self) -> None:
        self._ticks = itertools.count()
        # Oldest stamp first; lets victims() walk in order when the candidates are most of what is tracked.
        self._order: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def on_add(self, cluster_id: str, now_s: float) -> None:
        del now_s
        self._order[cluster_id] = next(self._ticks)
        self._order.move_to_end(cluster_id)

    def on_touch(self, cluster_id: str, now_s: float, retrieved: bool) -> None:
        del now_s, retrieved
        if cluster_id not in self._order:
            raise UnknownClusterError(f"lru policy does not track cluster {cluster_id!r}")
        self._order[cluster_id] = next(self._ticks)
        self._order.move_to_end(cluster_id)

    def on_remove(self, cluster_id: str) -> None:
        self._order.pop(cluster_id, None)

    def priority(self, cluster_id: str, now_s: float) -> tuple[float, int]:
        del now_s
        return (0.0, self._order[cluster_id])

    def victims(self, candidates: Iterable[str], now_s: float) -> Iterator[str]:
        del now_s
        pool = candidates if isinstance(candidates, set | frozenset | dict) else set(candidates)
        if 2 * len(pool) >= len(self._order):
            return (cluster_id for cluster_id in self._order if cluster_id in pool)
        return _lazy_sorted(pool, lambda cluster_id: (0.0, self._order[cluster_id]))


@dataclass(slots=True)
class _HeatState:
    heat: float  # decayed retrieval count as of heat_at_s
    heat_at_s: float
    tick: int  # recency stamp, breaks ties between equally hot clusters


class HeatPolicy:
    """Retrieval heat: an exponentially decayed count of retrievals, ties broken by recency.

    Heat halves every ``half_life_s`` seconds without retrievals, so a cluster that questions keep coming
    back to stays hot, and one that was popular an hour ago cools down. Plain touches (ingest, reads that
    were not a retrieval) only refresh recency, which orders clusters of equal heat (e.g. never retrieved).
    """

    name = "heat"

    def __init__(self, *, half_life_s: float = 60.0) -> None:
        if not (isinstance(half_life_s, int | float) and math.isfinite(half_life_s) and half_life_s > 0):
            raise ConfigError(f"heat policy half_life_s must be a finite number > 0, got {half_life_s!r}")
        self.half_life_s = float(half_life_s)
        self._ticks = itertools.count()
        self._state: dict[str, _HeatState] = {}

    def __len__(self) -> int:
        return len(self._state)

    def heat(self, cluster_id: str, now_s: float | None = None) -> float:
        """Decayed retrieval count of ``cluster_id`` at ``now_s``."""
        state = self._state[cluster_id]
        if state.heat == 0.0:
            return 0.0
        # A clock that steps back must not heat clusters up.
        elapsed_s = max(0.0, _now(now_s) - state.heat_at_s)
        return state.heat * math.exp2(-elapsed_s / self.half_life_s)

    def on_add(self, cluster_id: str, now_s: float) -> None:
        self._state[cluster_id] = _HeatState(heat=0.0, heat_at_s=now_s, tick=next(self._ticks))

    def on_touch(self, cluster_id: str, now_s: float, retrieved: bool) -> None:
        state = self._state.get(cluster_id)
        if state is None:
            raise UnknownClusterError(f"heat policy does not track cluster {cluster_id!r}")
        if retrieved:
            state.heat = self.heat(cluster_id, now_s) + 1.0
            state.heat_at_s = now_s
        state.tick = next(self._ticks)

    def on_remove(self, cluster_id: str) -> None:
        self._state.pop(cluster_id, None)

    def priority(self, cluster_id: str, now_s: float) -> tuple[float, int]:
        return (self.heat(cluster_id, now_s), self._state[cluster_id].tick)

    def victims(self, candidates: Iterable[str], now_s: float) -> Iterator[str]:
        return _lazy_sorted(candidates, lambda cluster_id: self.priority(cluster_id, now_s))


_POLICIES: dict[str, Callable[..., EvictionPolicy]] = {"lru": LruPolicy, "heat": HeatPolicy}
POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)


def make_policy(name: str, **options: float) -> EvictionPolicy:
    """Build an eviction policy by name.

    Args:
        name: one of ``POLICY_NAMES`` ("lru", "heat").
        **options: keyword settings of that policy, e.g. ``half_life_s`` for "heat".

    Raises:
        UnknownPolicyError: ``name`` is not a known policy.
        ConfigError: an option is unknown to that policy or out of range.
    """
    factory = _POLICIES.get(name)
    if factory is None:
        raise UnknownPolicyError(f"unknown eviction policy {name!r}; valid names: {', '.join(POLICY_NAMES)}")
    try:
        return factory(**options)
    except TypeError as exc:
        raise ConfigError(f"eviction policy {name!r} does not take options {sorted(options)}: {exc}") from exc
