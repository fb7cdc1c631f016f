"""Metadata store for streams, clusters (span, size, tier placement) and worker assignment.

``InMemoryMetadataStore`` is the embedded default; ``RedisMetadataStore`` is shared across the router and
the workers of a deployment. Both satisfy the same ``MetadataStore`` contract. KV bytes never go here.
The Redis store is imported lazily so the in-memory store works without the redis package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.metadata.base import (
    MAX_CENTROID_SUMMARY_FLOATS,
    TIERS,
    ClusterMeta,
    MetadataStore,
    StreamRecord,
    validate_id,
    validate_tier,
)
from services.metadata.memory import InMemoryMetadataStore

if TYPE_CHECKING:
    from services.metadata.redis_store import RedisMetadataStore

__all__ = [
    "MAX_CENTROID_SUMMARY_FLOATS",
    "TIERS",
    "ClusterMeta",
    "InMemoryMetadataStore",
    "MetadataStore",
    "RedisMetadataStore",
    "StreamRecord",
    "validate_id",
    "validate_tier",
]


def __getattr__(name: str) -> object:
    if name == "RedisMetadataStore":
        from services.metadata.redis_store import RedisMetadataStore

        return RedisMetadataStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
