"""Cluster and residency bookkeeping: plain Python, no torch, testable in milliseconds.

- ``tiers``: the tier enum, byte budgets, and planned moves between tiers.
- ``residency``: each cluster's memory record (tier, size, pins, pages in each pool; ``ClusterResidency``, its
  one owner), reservations, two-phase spill/fetch plans.
- ``cluster_residency``: that record, with its summary row and co-retrieval counts.
- ``usage``: cluster and byte counts, the engine's (``ResidencyStats``) and each stream's.
- ``planning``: the spill/fetch plans ``residency`` makes (mixed into ``ResidencyManager``).
- ``pages``: the page allocator and a cluster's page record, which the torch layer fills in.
- ``policies``: eviction policies ("lru", "heat") ranking clusters coldest first.
- ``formation``: per-stream online clustering of frames by visual coherence.
- ``formation_config``: when a frame joins the open cluster (``FormationConfig``).
- ``cluster_record``: one cluster's frames and time span, as formation keeps them.
- ``maintenance``: co-retrieval statistics that propose merging adjacent clusters.
"""

from mosaic_core.bookkeeping.cluster_record import ClusterRecord
from mosaic_core.bookkeeping.cluster_residency import ClusterResidency
from mosaic_core.bookkeeping.formation import FORMATION_REASONS, ClusterFormer, FormationDecision
from mosaic_core.bookkeeping.formation_config import FormationConfig
from mosaic_core.bookkeeping.maintenance import CoRetrievalTracker, MergeProposal
from mosaic_core.bookkeeping.policies import POLICY_NAMES, EvictionPolicy, HeatPolicy, LruPolicy, make_policy
from mosaic_core.bookkeeping.residency import ResidencyManager
from mosaic_core.bookkeeping.tiers import Move, MovePlan, Tier, TierBudgets
from mosaic_core.bookkeeping.usage import ResidencyStats

__all__ = [
    "FORMATION_REASONS",
    "POLICY_NAMES",
    "ClusterFormer",
    "ClusterRecord",
    "ClusterResidency",
    "CoRetrievalTracker",
    "EvictionPolicy",
    "FormationConfig",
    "FormationDecision",
    "HeatPolicy",
    "LruPolicy",
    "MergeProposal",
    "Move",
    "MovePlan",
    "ResidencyManager",
    "ResidencyStats",
    "Tier",
    "TierBudgets",
    "make_policy",
]
