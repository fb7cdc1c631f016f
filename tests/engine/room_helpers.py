"""Engines with no room for frames to leave their windows: every cluster pinned and the free bytes held, as when
running questions pin what they read; and the checks that no KV went missing."""

from __future__ import annotations

from mosaic_core.bookkeeping.tiers import Tier

HELD = "a question's pages"


def fill_with_pinned(engine, *, grower: str | None = "cam", next_to_grow_too: bool = True) -> None:
    """Every cluster pinned (without ``next_to_grow_too``, all but the one the oldest window frame of stream
    ``grower`` joins), and the free bytes of the device and the host held by others."""
    residency = engine.tiering.residency
    next_to_grow = engine.stream(grower).local[0].cluster_id if grower is not None else None
    for cluster_id in residency.tracked_ids():
        if (next_to_grow_too or cluster_id != next_to_grow) and not residency.record(cluster_id).pinned:
            residency.pin(cluster_id)
    residency.reserve(HELD, residency.free_bytes(Tier.DEVICE))
    assert residency.charge(HELD, Tier.HOST, residency.free_bytes(Tier.HOST))


def give_room_back(engine) -> None:
    residency = engine.tiering.residency
    for cluster_id in residency.tracked_ids():
        if residency.record(cluster_id).pinned:
            residency.unpin(cluster_id)
    residency.release(HELD)
    residency.discharge(HELD, Tier.HOST)


def missing_tokens(engine, stream_id: str) -> dict[str, int]:
    """Per cluster of the stream, its formed tokens held neither by its stored pages nor by the local window."""
    state, residency = engine.stream(stream_id), engine.tiering.residency
    in_window: dict[str, int] = {}
    for frame in state.local:
        in_window[frame.cluster_id] = in_window.get(frame.cluster_id, 0) + frame.num_tokens
    missing = {}
    for record in state.former.records_to_read():
        stored = sum(residency.record(record.cluster_id).pages.fills) if record.cluster_id in residency else 0
        held = stored + in_window.get(record.cluster_id, 0)
        if held != record.num_tokens:
            missing[record.cluster_id] = record.num_tokens - held
    return missing


def unowned_device_pages(engine) -> int:
    """Device pages in use that neither a stream's sink or window nor a cluster owns (leaked)."""
    residency = engine.tiering.residency
    owned = [page for state in engine.streams.values() for page in state.past_pages()]
    owned += [page for cid in residency.tracked_ids() for page in residency.record(cid).pages.device or []]
    assert len(owned) == len(set(owned))
    return engine.tiering.tiers.pools.device_pages.num_used - len(owned)
