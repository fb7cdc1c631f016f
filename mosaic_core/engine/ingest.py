"""Ingest: frames of many streams, encoded in shared forward passes with bounded attention.

vision tower (all frames of the batch, grouped by size)
  -> pass r: row per stream carrying its next frames  -> attends to sink + local window + the row
  -> each frame joins a cluster (visual coherence) and enters the local window
  -> frames leaving the window hand their pages to their cluster, in whichever tier it lives
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mosaic_core.engine.ingest_pass import HostTimes, ingest_pass, tokens_of_row
from mosaic_core.engine.ingest_pauses import IngestPauses
from mosaic_core.engine.parts import EngineParts
from mosaic_core.engine.results import FrameInput, IngestResult
from mosaic_core.engine.tower import EncodedFrames, queue_tower
from mosaic_core.engine.window_store import store_held_back, why_held_back
from mosaic_core.errors import EmptyBatchError, InvalidArgumentError, MosaicError
from mosaic_core.model.pixels import validate_frames

# Rows of at least this share of the longest row's tokens share its forward pass.
PASS_FILL = 0.8


@dataclass(slots=True)
class _Passes:
    """What an ingest call's forward passes did, added up pass by pass."""

    taken: dict[str, int]  # frames taken in, per stream of the call
    times: HostTimes = field(default_factory=HostTimes)
    num_passes: int = 0
    num_clusters_opened: int = 0
    attended: list[int] = field(default_factory=list)  # tokens each frame attended to, in the order placed


def encode(parts: EngineParts, frames: Sequence[FrameInput], pauses: IngestPauses | None = None) -> EncodedFrames:
    """Queues a batch's uploads, keyframe thumbnails and vision tower ahead of its ingest call, which ``ingest``
    with ``encoded`` then skips; with ``pauses``, pausing where the call's own tower would. The batch is checked as
    ``ingest`` checks it. What it changes is what the call's own tower would: a new stream's frame size and window
    reservation (whose room may spill other clusters), fixed by its first frame either way."""
    if not frames:
        raise EmptyBatchError("encoding needs at least one frame; the batch was empty")
    by_stream = _validate(parts, frames)
    _begin_call(parts, pauses)
    work = queue_tower(parts, by_stream, pauses)
    streams = {stream_id: parts.streams[stream_id] for stream_id in by_stream}
    return EncodedFrames(tuple(frames), streams, work)


def _begin_call(parts: EngineParts, pauses: IngestPauses | None) -> None:
    """Tells ``pauses`` (if any) that a call's tower is about to be queued, and on which streams questions run."""
    if pauses is not None:
        tower_apart = parts.tower_stream is not None
        pauses.begin_call(parts.question_stream, parts.tiering.tiers.transfers.side, tower_apart=tower_apart)


def ingest(
    parts: EngineParts,
    frames: Sequence[FrameInput],
    pauses: IngestPauses | None = None,
    encoded: EncodedFrames | None = None,
) -> IngestResult:
    """Encodes a batch of frames from any number of streams.

    The batch is checked whole before anything changes, so a bad frame rejects the call and leaves every
    stream as it was; the error names its stream (``MosaicError.stream_id``). Frames of different streams share
    forward passes, one row per stream; a row carries up to ``config.max_frames_per_pass`` consecutive frames of
    its stream (a backlog catches up in fewer passes, still attending only to sink + local window + the row
    itself). With ``pauses`` the call stops at fixed points for its caller (``mosaic_core.engine.ingest_pauses``).
    With ``encoded`` for these very frames (``encode``), the call queues no vision tower of its own, and makes none
    of the pauses after or inside it; an ``encoded`` for other frames is ignored.

    Frames leaving a window whose clusters cannot be stored (no room in any tier, or a store that fails) stay in the
    window, KV kept (``store_in_clusters``); their stream's later frames in the call are not taken in, nor any of its
    frames in later calls until those are stored (``store_held_back``). ``IngestResult.refused`` counts them, and
    ``IngestResult.held_back`` says why; the other streams' frames go on as usual (with ``encoded``, still with it).
    """
    if not frames:
        raise EmptyBatchError("ingest needs at least one frame; the batch was empty")
    by_stream = _validate(parts, frames)
    held_back = store_held_back(parts, by_stream)
    taking = {sid: items for sid, items in by_stream.items() if sid not in held_back}
    if not taking:
        return _nothing_taken(by_stream, held_back)
    if parts.history is not None:  # every id the call may give out, before anything changes
        for stream_id, items in taking.items():
            parts.history.ensure_ids(parts.streams[stream_id], frames=len(items), clusters=len(items))
    _begin_call(parts, pauses)
    start = time.perf_counter()
    encoded_ahead = encoded is not None and encoded.is_for(frames, parts.streams)
    features = _tower_features(parts, taking, pauses, encoded if encoded_ahead else None)
    encode_s = time.perf_counter() - start
    passes = _run_passes(parts, by_stream, taking, features, held_back, pauses)
    if parts.history is not None:
        for stream_id in taking:
            parts.history.note_progress(parts.streams[stream_id])
    taken = passes.taken
    refused = {sid: len(items) - taken[sid] for sid, items in by_stream.items() if taken[sid] < len(items)}
    return IngestResult(
        num_frames=len(frames) - sum(refused.values()),
        num_forward_passes=passes.num_passes,
        num_clusters_opened=passes.num_clusters_opened,
        encode_s=encode_s,
        prefill_s=time.perf_counter() - start - encode_s,
        attended_tokens_per_frame=passes.attended,
        issue_s=passes.times.issue_s,
        wait_s=passes.times.wait_s,
        place_s=passes.times.place_s,
        encoded_ahead=encoded_ahead,
        refused=refused,
        held_back={sid: why_held_back(err) for sid, err in held_back.items()},
    )


def _tower_features(parts: EngineParts, taking, pauses: IngestPauses | None, encoded: EncodedFrames | None):
    """The vision tower's output for the frames taken in: ``encoded``'s (queued ahead for these very frames), or a
    tower queued now. Where the tower runs on a stream of its own, the language model's stream waits for it on the
    device."""
    work = encoded.work if encoded is not None else queue_tower(parts, taking, pauses)
    work.read_on(torch.cuda.current_stream(parts.model.device) if parts.tower_stream is not None else None)
    return work.features


def _run_passes(
    parts: EngineParts, by_stream, taking, features, held_back: dict[str, Exception], pauses: IngestPauses | None
) -> _Passes:
    """Every forward pass of a call, in rounds: round r carries the r-th ``config.max_frames_per_pass`` frames of
    each stream that has them, in passes of rows of similar length (``_pass_groups``). A stream whose frames find no
    room as they leave its window joins ``held_back``, and takes no frames in from the next round on."""
    passes = _Passes(taken=dict.fromkeys(by_stream, 0))
    chunk = parts.config.max_frames_per_pass
    rounds = max(-(-len(items) // chunk) for items in taking.values())
    for r in range(rounds):
        rows = [
            (
                sid,
                list(range(r * chunk, min(len(items), (r + 1) * chunk))),
                [f for f, _ in items[r * chunk :][:chunk]],
            )
            for sid, items in taking.items()
            if r * chunk < len(items) and sid not in held_back
        ]
        for group in _pass_groups(rows, features):
            opened, tokens, no_room = ingest_pass(parts, group, features, pauses, passes.times)
            passes.num_passes += 1
            passes.num_clusters_opened += opened
            passes.attended.extend(tokens)
            held_back.update(no_room)
            for sid, indices, _ in group:
                passes.taken[sid] += len(indices)
    return passes


def _nothing_taken(by_stream, held_back: dict[str, Exception]) -> IngestResult:
    """A call none of whose streams can take frames in (``store_held_back``)."""
    return IngestResult(
        num_frames=0,
        num_forward_passes=0,
        num_clusters_opened=0,
        encode_s=0.0,
        prefill_s=0.0,
        attended_tokens_per_frame=[],
        refused={sid: len(items) for sid, items in by_stream.items()},
        held_back={sid: why_held_back(err) for sid, err in held_back.items()},
    )


def _seconds(frame: FrameInput) -> float:
    try:
        return float(frame.timestamp_s)
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"stream {frame.stream_id!r}: a frame's timestamp must be a number, not {frame.timestamp_s!r}"
        ) from None


def _validate(parts: EngineParts, frames: Sequence[FrameInput]) -> dict[str, list[tuple[FrameInput, np.ndarray]]]:
    by_stream: dict[str, list[tuple[FrameInput, np.ndarray]]] = defaultdict(list)
    for frame in frames:
        try:
            state = parts.stream(frame.stream_id)
            state.check_open()
            frame.timestamp_s = _seconds(frame)  # a NumPy number would reach the journal, which writes JSON
            previous = by_stream[frame.stream_id][-1][0].timestamp_s if by_stream[frame.stream_id] else None
            state.check_timestamp(frame.timestamp_s, previous if previous is not None else state.last_timestamp_s)
            rgb = validate_frames(frame.rgb)[0]
        except MosaicError as err:
            err.stream_id = frame.stream_id
            raise
        by_stream[frame.stream_id].append((frame, rgb))
    return dict(by_stream)


def _pass_groups(rows, features) -> list[list]:
    """Rows for one forward pass each: a row shares the pass of the longest rows when it has at least
    ``PASS_FILL`` of their tokens (and is left-padded to them); shorter rows start a pass of their own."""
    tokens = {row[0]: tokens_of_row(row, features) for row in rows}  # one row per stream
    groups: list[list] = []
    for row in sorted(rows, key=lambda row: -tokens[row[0]]):
        if groups and tokens[row[0]] >= PASS_FILL * tokens[groups[-1][0][0]]:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups
