"""How ``ResidencyManager`` plans moves: which clusters to spill to make room, and whether a plan still applies.

Plans are sequential: every move fits in its destination at the moment it runs, given the moves before it.
So spills come before the fetch they make room for, and a spill into a full host tier is preceded by the
host->disk spills that make room for it. ``MovePlanningMixin`` is mixed into ``ResidencyManager``: it reads the
manager's records, tier members, used bytes and eviction policy, and changes none of them (``apply`` does).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from mosaic_core.bookkeeping.tiers import Move, MovePlan, Tier
from mosaic_core.errors import InvalidArgumentError, StateError


class MovePlanningMixin:
    """The planning half of ``ResidencyManager`` (module doc); the manager's ``__init__`` sets up what it reads."""

    def pick_victims(
        self, tier: Tier, nbytes: int, *, exclude: frozenset[str] = frozenset(), now_s: float | None = None
    ) -> list[str] | None:
        """Coldest unpinned, non-excluded clusters of ``tier`` whose bytes add up to at least ``nbytes``.

        Ignores free space; useful to choose what to drop from the coldest tier. None if there are not enough.
        """
        return self._pick(self._enabled(tier), check_nbytes(nbytes), exclude, now_or_monotonic(now_s))

    def plan_make_room(
        self, tier: Tier, nbytes: int, *, exclude: frozenset[str] = frozenset(), now_s: float | None = None
    ) -> MovePlan | None:
        """Spills that leave at least ``nbytes`` free in ``tier``, cascading to colder tiers as needed.

        Returns an empty plan if the bytes are already free, and None if no set of unpinned, non-excluded
        clusters can make room (every colder tier full of pinned data, or no colder tier at all).
        """
        moves = self._make_room(self._enabled(tier), check_nbytes(nbytes), exclude, now_or_monotonic(now_s))
        return None if moves is None else MovePlan(moves)

    def plan_fetch(
        self,
        cluster_id: str,
        to: Tier = Tier.DEVICE,
        *,
        exclude: frozenset[str] = frozenset(),
        now_s: float | None = None,
    ) -> MovePlan | None:
        """Spills needed plus the fetch of ``cluster_id`` into ``to``; see ``plan_fetch_many``."""
        return self.plan_fetch_many([cluster_id], to, exclude=exclude, now_s=now_s)

    def plan_fetch_many(
        self,
        cluster_ids: Sequence[str],
        to: Tier = Tier.DEVICE,
        *,
        exclude: frozenset[str] = frozenset(),
        now_s: float | None = None,
    ) -> MovePlan | None:
        """Bring several clusters to ``to`` together, so that fetching one never evicts another.

        Clusters already in ``to`` or hotter stay where they are. Returns None if room cannot be made.

        Raises:
            UnknownClusterError: an id is not tracked.
            StateError: a cluster that would have to move is pinned.
        """
        to = self._enabled(to)
        records = [self._get(cid) for cid in dict.fromkeys(cluster_ids)]
        moving = [record for record in records if record.tier > to]
        pinned = [record.cluster_id for record in moving if record.pinned]
        if pinned:
            raise StateError(f"cannot fetch pinned clusters {pinned}: unpin them first")
        keep = exclude | {record.cluster_id for record in records}
        spills = self._make_room(to, sum(r.num_bytes for r in moving), keep, now_or_monotonic(now_s))
        if spills is None:
            return None
        return MovePlan(spills + [Move(r.cluster_id, r.tier, to, r.num_bytes) for r in moving])

    def plan_spill(
        self, cluster_id: str, to: Tier, *, exclude: frozenset[str] = frozenset(), now_s: float | None = None
    ) -> MovePlan | None:
        """Move ``cluster_id`` to the colder tier ``to``, spilling others from ``to`` onwards if it is full.

        Raises:
            InvalidArgumentError: ``to`` is hotter than the cluster's tier.
            StateError: the cluster is pinned.
        """
        to = self._enabled(to)
        record = self._get(cluster_id)
        if to < record.tier:
            raise InvalidArgumentError(f"cannot spill {cluster_id!r} from {record.tier.name} up to {to.name}")
        if to == record.tier:
            return MovePlan()
        if record.pinned:
            raise StateError(f"cannot spill pinned cluster {cluster_id!r}")
        room = self._make_room(to, record.num_bytes, exclude | {cluster_id}, now_or_monotonic(now_s))
        if room is None:
            return None
        return MovePlan([*room, Move(cluster_id, record.tier, to, record.num_bytes)])

    def is_valid(self, plan: MovePlan) -> bool:
        """Whether ``plan`` still applies to the current state (nothing changed under it since planning)."""
        return self._plan_error(plan) is None

    def _colder_tiers(self, tier: Tier) -> list[Tier]:
        return [t for t in Tier if t > tier and self.capacity_bytes(t) > 0]

    def _pick(self, tier: Tier, nbytes: int, exclude: frozenset[str], now_s: float) -> list[str] | None:
        victims: list[str] = []
        freed_bytes = 0
        if nbytes <= 0:
            return victims
        for cid in self.policy.victims(self._by_tier[tier], now_s):
            record = self._records[cid]
            # Zero-byte clusters free nothing; moving them would only add transfer calls.
            if record.pinned or cid in exclude or record.num_bytes == 0:
                continue
            victims.append(cid)
            freed_bytes += record.num_bytes
            if freed_bytes >= nbytes:
                return victims
        return None

    def _make_room(self, tier: Tier, nbytes: int, exclude: frozenset[str], now_s: float) -> list[Move] | None:
        shortfall = nbytes - self.free_bytes(tier)
        if shortfall <= 0:
            return []
        if nbytes > self.capacity_bytes(tier):
            return None
        victims = self._pick(tier, shortfall, exclude, now_s)
        if victims is None:
            return None
        victim_bytes = sum(self._records[cid].num_bytes for cid in victims)
        # The victims go to the nearest colder tier that can make room for all of them (a small host tier is
        # skipped rather than failing the plan); the spills making that room run first.
        for dst in self._colder_tiers(tier):
            room = self._make_room(dst, victim_bytes, exclude, now_s)
            if room is not None:
                return room + [Move(cid, tier, dst, self._records[cid].num_bytes) for cid in victims]
        return None

    def _plan_error(self, plan: MovePlan) -> str | None:
        tiers: dict[str, Tier] = {}
        used = dict(self._used_bytes)
        for index, move in enumerate(plan.moves):
            record = self._records.get(move.cluster_id)
            if record is None:
                return f"move {index}: cluster {move.cluster_id!r} is not tracked"
            src = tiers.get(move.cluster_id, record.tier)
            if src != move.src:
                return f"move {index}: {move.cluster_id!r} is in {src.name}, plan says {move.src.name}"
            if move.num_bytes != record.num_bytes:
                return f"move {index}: {move.cluster_id!r} has {record.num_bytes} bytes, not {move.num_bytes}"
            if record.pinned:
                return f"move {index}: {move.cluster_id!r} is pinned"
            if used[move.dst] + move.num_bytes > self.capacity_bytes(move.dst):
                return f"move {index}: {move.num_bytes} bytes of {move.cluster_id!r} overflow {move.dst.name}"
            used[move.src] -= move.num_bytes
            used[move.dst] += move.num_bytes
            tiers[move.cluster_id] = move.dst
        return None


def now_or_monotonic(now_s: float | None) -> float:
    return time.monotonic() if now_s is None else now_s


def check_nbytes(nbytes: int) -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise InvalidArgumentError(f"byte counts must be ints >= 0, got {nbytes!r}")
    return nbytes
