"""Frames leaving the local windows: their pages go to their clusters, in whichever tier each lives.

A cluster whose last frame is stored becomes durable, may join an earlier visit to its scene, and may get its host
copy. A frame whose cluster cannot be stored (no room in any tier, a disk that refuses the write, an allocation that
fails) stays at the front of its window, KV kept, and its stream takes in no new frames until it has left.
"""

from __future__ import annotations

import logging

import torch

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.engine.maintenance import join_recurring
from mosaic_core.engine.parts import EngineParts
from mosaic_core.engine.stream import LocalFrame, StreamState
from mosaic_core.errors import CapacityError

# What placing a frame's KV in its cluster may meet: no room in any tier, a disk that refuses a write (full, or
# failing), an allocation that fails (torch raises RuntimeError, such as pinning host memory). The frame waits in its
# window for the next call to try again.
_PLACEMENT_ERRORS = (CapacityError, OSError, RuntimeError)
log = logging.getLogger(__name__)


def store_in_clusters(parts: EngineParts, leaving: list[tuple[StreamState, LocalFrame]]) -> dict[str, Exception]:
    """Frames leaving the local windows (oldest first per stream) hand their pages to their clusters, wherever
    those live (on the device, without a copy).

    Their keys' statistics are read first, for all the frames at once, while the pages are still theirs; once every
    cluster has its record they go into the summary rows with one indexed add. Then each frame's durable and
    recurring-scene steps run in order: a frame that completes a cluster is that cluster's last among them, so the
    row it is sealed or joined with is whole. Whether a frame completed its cluster is read once, from the record in
    place (a copy grows with the cluster's frames), and only a completed cluster goes through those steps.

    A frame whose cluster finds no room in any tier, or whose placement fails (a disk that refuses the write, a
    host allocation that fails), goes back to the front of its window with its stream's frames after it, KV and
    pages unchanged, and waits there (``store_held_back``); the other streams' frames are stored. Returns those
    streams, each with the error that held it back. The steps after a cluster completes are each cluster's own
    (``_complete``): one that fails does not keep the others' from running.
    """
    if not leaving:
        return {}
    pools, tiering = parts.tiering.tiers.pools, parts.tiering
    pages = [page for _, frame in leaving for page in frame.pages]
    fills = [fill for _, frame in leaving for fill in frame.fills]
    key_sums, key_sumsqs = pools.key_stats(pages, fills)
    handed, held_back = _hand_to_clusters(parts, leaving)
    stored = [item for item, was_handed in zip(leaving, handed, strict=True) if was_handed]
    if held_back:
        page_handed = [was_handed for (_, frame), was_handed in zip(leaving, handed, strict=True) for _ in frame.pages]
        mask = torch.tensor(page_handed, dtype=torch.bool, device=key_sums.device)
        key_sums, key_sumsqs = key_sums[mask], key_sumsqs[mask]
        fills = [fill for fill, was_handed in zip(fills, page_handed, strict=True) if was_handed]
        _return_to_windows([item for item, was_handed in zip(leaving, handed, strict=True) if not was_handed])
    if stored:
        page_clusters = [frame.cluster_id for _, frame in stored for _ in frame.pages]
        tiering.summaries.add_stats(page_clusters, key_sums, key_sumsqs, fills)
    for state, frame in stored:
        record = state.former.known_record_to_read(frame.cluster_id)
        if record.completed_by(frame.frame_index):
            _complete(parts, state, record)
    return held_back


def _complete(parts: EngineParts, state: StreamState, record) -> None:
    """A cluster's last frame is stored: it becomes durable, may join an earlier visit to its scene, and may get its
    host copy. A failure here (a snapshot read from a disk that fails, a join's copy the disk refuses) is logged:
    the cluster's KV stays where it was stored, and the other clusters completed in the pass still go on."""
    step = "making it durable"
    try:
        if parts.history is not None:
            parts.history.on_completed(state, record)
        step = "joining it with an earlier visit, or copying it to the host"
        joined = join_recurring(parts, state, record.cluster_id)
        _copy_to_host_if_nearly_full(parts, joined or record.cluster_id)
    except Exception:
        log.exception("stream %s: cluster %s completed, but %s failed", state.stream_id, record.cluster_id, step)


def _hand_to_clusters(
    parts: EngineParts, leaving: list[tuple[StreamState, LocalFrame]]
) -> tuple[list[bool], dict[str, Exception]]:
    """Hands the frames' pages to their clusters in order. A stream's first frame whose cluster finds no room in
    any tier, or whose placement fails (``_PLACEMENT_ERRORS``; the cluster is left as it was), and the stream's frames
    after it are not handed over. Returns, per frame, whether it was, and the streams held back with their errors.
    Any other error is a bug: the frames not handed over yet go back to their windows before it is raised."""
    tiering = parts.tiering
    prefer = Tier.DEVICE if parts.config.mode.caches_on_device else Tier.HOST
    handed, held_back = [], {}
    for n, (state, frame) in enumerate(leaving):
        if state.stream_id not in held_back:
            try:
                if frame.cluster_id in tiering.residency:
                    tiering.append_pages(frame.cluster_id, frame.pages, frame.fills)
                else:
                    tiering.admit_pages(frame.cluster_id, state.stream_id, frame.pages, frame.fills, prefer=prefer)
            except _PLACEMENT_ERRORS as err:
                held_back[state.stream_id] = err
            except BaseException:
                kept = [item for item, was_handed in zip(leaving, handed, strict=False) if not was_handed]
                _return_to_windows(kept + leaving[n:])
                raise
        handed.append(state.stream_id not in held_back)
    return handed, held_back


def _return_to_windows(kept: list[tuple[StreamState, LocalFrame]]) -> None:
    """Puts frames that could not leave back at the front of their windows, oldest first."""
    by_stream: dict[str, tuple[StreamState, list[LocalFrame]]] = {}
    for state, frame in kept:
        by_stream.setdefault(state.stream_id, (state, []))[1].append(frame)
    for state, frames in by_stream.values():
        state.return_to_window(frames)


def store_held_back(parts: EngineParts, stream_ids) -> dict[str, CapacityError]:
    """Stores the frames that ``store_in_clusters`` kept in a window past its size, before the stream takes pages
    for new frames (its window reservation holds one pass of frames beyond the window, not more). Returns the
    streams whose frames still cannot be stored, each with why: they take no new frames."""
    still: dict[str, CapacityError] = {}
    for stream_id in stream_ids:
        state = parts.streams[stream_id]
        waiting = state.pop_overflow(parts.config.local_window_tokens)
        held_back = store_in_clusters(parts, [(state, frame) for frame in waiting])
        if held_back:
            still[stream_id] = CapacityError(
                f"stream {stream_id!r} takes no new frames: the oldest frames of its local window could not leave it "
                f"yet ({why_held_back(held_back[stream_id])})"
            )
    return still


def _copy_to_host_if_nearly_full(parts: EngineParts, cluster_id: str) -> None:
    """A cluster just completed (sealed, its last frame stored) gets its host copy now when the device tier is
    nearly full (``EngineConfig.host_copy_below_device_free``), so that the spill that will make room for a
    question frees its pages without copying in the question's time."""
    share = parts.config.host_copy_below_device_free
    residency = parts.tiering.residency
    if not share or cluster_id not in residency:
        return
    if residency.free_bytes(Tier.DEVICE) < share * residency.capacity_bytes(Tier.DEVICE):
        parts.tiering.tiers.keep_host_copy(cluster_id)


def why_held_back(err: Exception) -> str:
    """An error that held a stream's frames back, in words: a no-room error says it all, others name their type."""
    return str(err) if isinstance(err, CapacityError) else f"{type(err).__name__}: {err}"


def flush_window(parts: EngineParts, state: StreamState) -> dict[str, Exception]:
    """Moves every frame of the local window into its cluster (a checkpoint before shutdown); returns the stream,
    with why, when some could not be stored and stay in the window (``store_in_clusters``)."""
    return store_in_clusters(parts, [(state, old) for old in state.pop_overflow(0)])
