"""One forward pass of ingest (``ingest_pass``): rows of frames of several streams, left-padded to the longest, each
attending to its stream's sink, local window and itself; then each frame placed into a cluster, and the clusters of
frames leaving the windows stored. ``mosaic_core.engine.ingest`` groups a call's frames into these passes."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mosaic_core.bookkeeping.pages import pages_for
from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.engine.coherence import CoherenceReadback, OpenSums
from mosaic_core.engine.ingest_pauses import IngestPauses
from mosaic_core.engine.keyframe_store import store_for
from mosaic_core.engine.maintenance import note_frame
from mosaic_core.engine.parts import EngineParts
from mosaic_core.engine.plans import IngestPlan
from mosaic_core.engine.results import FrameInput
from mosaic_core.engine.stream import LocalFrame, StreamState
from mosaic_core.engine.window_store import store_in_clusters

# A row shorter than its pass's longest is left-padded with this id; the pad's KV is never written.
PAD_TOKEN_ID = 0


@dataclass(slots=True)
class HostTimes:
    """Host seconds of an ingest call's passes, by what the host was doing (``IngestResult`` says what each is)."""

    issue_s: float = 0.0
    wait_s: float = 0.0
    place_s: float = 0.0


def ingest_pass(
    parts: EngineParts, rows, features, pauses: IngestPauses | None, times: HostTimes
) -> tuple[int, list[int], dict[str, Exception]]:
    """One forward pass; rows are ``(stream_id, frame indices in the batch, frames)``, one row per stream. Returns
    the clusters it opened, the tokens each frame attended to, and the streams whose frames could not be stored as
    they left the window (``store_in_clusters``).

    Row layout, for a row carrying frames f0 f1 of one stream, in a pass whose longest row is ``pad`` tokens
    longer:

        tokens:    [ pad | f0 visual tokens | f1 visual tokens ]
        attends:   sink + local window + causal within the row

    Attention is causal from the bottom right, so a left pad leaves every real token's view as it was; the pad
    tokens' KV is never written (``IngestPlan``), so no real token sees them.
    """
    if pauses is not None:
        pauses.begin_pass()
    start = time.perf_counter()
    inputs = _prepare_pass(parts, rows, features, pauses)
    shaping, first_readback = _queue_pass(parts, rows, features, inputs)
    issued = time.perf_counter()
    first = first_readback.values()
    waited = time.perf_counter()
    opened, attended, held_back = _place_rows(parts, rows, features, inputs, shaping, first_readback, first, pauses)
    times.issue_s += issued - start
    times.wait_s += waited - issued
    times.place_s += time.perf_counter() - waited
    return opened, attended, held_back


@dataclass(slots=True)
class _PassInputs:
    """A forward pass's inputs, uploaded, with the device pages each frame's KV is written to."""

    states: list[StreamState]  # one per row
    row_tokens: list[int]  # each row's tokens, its left pad not counted
    input_ids: torch.Tensor  # [rows, width]
    position_ids: torch.Tensor  # [3, rows, width]
    embeds: torch.Tensor  # [tokens of every frame of the pass, hidden]
    frame_pages: list[list[list[int]]]  # per row, per frame: its pages
    frame_fills: list[list[list[int]]]  # per row, per frame: the tokens in each of its pages
    plan: IngestPlan


def _prepare_pass(parts: EngineParts, rows, features, pauses: IngestPauses | None) -> _PassInputs:
    """Uploads a pass's token and position ids (rows left-padded to the longest), and takes each frame's pages."""
    states = [parts.streams[sid] for sid, _, _ in rows]
    row_tokens = [tokens_of_row(row, features) for row in rows]
    width = max(row_tokens)
    positions = _left_padded_positions(parts, states, rows, row_tokens)
    embeds = torch.cat([features[(sid, i)][0] for sid, indices, _ in rows for i in indices])
    pools = parts.tiering.tiers.pools
    ids = np.full((len(rows), width), parts.model.video_token_id, dtype=np.int64)
    for row, tokens in enumerate(row_tokens):
        ids[row, : width - tokens] = PAD_TOKEN_ID
    input_ids = pools.upload(ids, torch.long)
    # Each frame starts pages of its own, taken inside its stream's sink + window reservation.
    frame_fills = [
        [pages_for(features[(sid, i)][0].shape[0], pools.page_tokens) for i in indices] for sid, indices, _ in rows
    ]
    frame_pages = [[_take_pages(pools, len(fills)) for fills in row] for row in frame_fills]
    plan = IngestPlan(
        states,
        parts.spec,
        pools,
        [[p for pages in row for p in pages] for row in frame_pages],
        [[f for fills in row for f in fills] for row in frame_fills],
        width=width,
        pauses=pauses,
    )
    position_ids = pools.upload(positions, torch.long)
    return _PassInputs(states, row_tokens, input_ids, position_ids, embeds, frame_pages, frame_fills, plan)


def _queue_pass(parts: EngineParts, rows, features, inputs: _PassInputs):
    """Queues the language model's pass and the comparison of each row's first frame with its open cluster, in the
    order formation needs; returns what formation compares (``_shaping_summaries``) and the comparison, not read yet.

    Each row's first frame is compared with its open cluster in one batch, read back once; later frames of a row
    depend on the decisions before them, so they are compared one by one (``_place_rows``). Compared by their
    pictures alone (formation.key_weight 0), the first frames need only the tower's output: their comparison is
    queued before the language model and read as soon as it is done, so the host places frames while the language
    model runs."""
    by_pictures = parts.config.formation.key_weight == 0
    if by_pictures:
        shaping, first_readback = _compare_first_frames(parts, rows, features, inputs)
    parts.model.forward(
        input_ids=inputs.input_ids, position_ids=inputs.position_ids, plan=inputs.plan, frame_embeds=inputs.embeds
    )
    if not by_pictures:  # the frames' keys at the choosing layer come from this pass
        shaping, first_readback = _compare_first_frames(parts, rows, features, inputs)
    return shaping, first_readback


def _compare_first_frames(parts: EngineParts, rows, features, inputs: _PassInputs):
    shaping = _shaping_summaries(parts, rows, features, inputs.frame_pages, inputs.frame_fills)
    return shaping, CoherenceReadback([state.open_sums for state in inputs.states], [row[0] for row in shaping])


def _place_rows(
    parts: EngineParts,
    rows,
    features,
    inputs: _PassInputs,
    shaping: list[list[torch.Tensor]],
    first_readback: CoherenceReadback,
    first: list[tuple[float | None, float | None]],
    pauses: IngestPauses | None,
) -> tuple[int, list[int], dict[str, Exception]]:
    """Places a pass's frames into clusters, row by row, and stores the clusters of the frames leaving the windows
    (at each placement pause, and at the end). Returns the clusters opened, the tokens each frame attended to, and
    the streams held back (``store_in_clusters``). ``first`` is ``first_readback``'s values, already read."""
    opened, attended, leaving, held_back = 0, [], [], {}
    for row, (state, (sid, indices, frames)) in enumerate(zip(inputs.states, rows, strict=True)):
        end = 0
        for n, (i, frame) in enumerate(zip(indices, frames, strict=True)):
            frame_embeds, summary, small_of = features[(sid, i)]
            end += frame_embeds.shape[0]
            if n == 0:
                readback, index, coherence = first_readback, row, first[row]
            else:  # against the open cluster as this row's earlier frames left it
                readback, index = CoherenceReadback([state.open_sums], [shaping[row][n]]), 0
                coherence = readback.values()[0]
            open_after = functools.partial(readback.open_after, index)
            pages, fills = inputs.frame_pages[row][n], inputs.frame_fills[row][n]
            opened += _place_frame(parts, state, frame, pages, fills, summary, coherence, open_after, small_of)
            leaving += [(state, old) for old in state.pop_overflow(parts.config.local_window_tokens)]
            attended.append(inputs.plan.attended_tokens[row] - (inputs.row_tokens[row] - end))
        if pauses is not None and pauses.placed(len(frames), last_of_pass=row == len(rows) - 1):
            held_back.update(store_in_clusters(parts, leaving))
            leaving = []
            pauses.pause(parts.model.device)
    held_back.update(store_in_clusters(parts, leaving))
    return opened, attended, held_back


def _left_padded_positions(parts: EngineParts, states: list[StreamState], rows, row_tokens: list[int]) -> np.ndarray:
    """The pass's M-RoPE position ids ``[3, rows, width]``: each row's frames at their offsets from its stream's
    first frame (which a stream's first pass records), right-aligned; a left pad repeats its row's first position."""
    width = max(row_tokens)
    positions = np.empty((3, len(rows), width), dtype=np.int64)
    for row, (state, (_, _, frames), tokens) in enumerate(zip(states, rows, row_tokens, strict=True)):
        if state.first_timestamp_s is None:
            state.first_timestamp_s = frames[0].timestamp_s
        row_positions = parts.model.frame_positions(
            state.geometry,
            base=state.position_base,
            offsets_s=[f.timestamp_s - state.first_timestamp_s for f in frames],
        )
        positions[:, row, width - tokens :] = row_positions
        positions[:, row, : width - tokens] = row_positions[:, :1]
    return positions


def _shaping_summaries(parts: EngineParts, rows, features, frame_pages, frame_fills) -> list[list[torch.Tensor]]:
    """What formation compares, per row and frame: the frame's vision summary, or, with ``formation.key_weight``
    w > 0, the unit vision summary scaled by sqrt(1 - w) beside the unit mean key of the frame's tokens at the
    choosing layer (every KV head, just written to its pages) scaled by sqrt(w). The cosine of two such vectors is
    (1 - w) times the vision cosine plus w times the key cosine."""
    weight = parts.config.formation.key_weight
    vision = [[features[(sid, i)][1] for i in indices] for sid, indices, _ in rows]
    if weight == 0:
        return vision
    keys, _ = parts.tiering.tiers.pools.layer_pages(parts.config.prefetch_after_layer or 0)
    out = []
    for summaries, pages_of, fills_of in zip(vision, frame_pages, frame_fills, strict=True):
        row = []
        for summary, pages, fills in zip(summaries, pages_of, fills_of, strict=True):
            frame_keys = torch.cat([keys[p, :, :fill] for p, fill in zip(pages, fills, strict=True)], dim=1)
            mean_key = frame_keys.float().mean(dim=1).flatten()  # [H * D]
            unit = torch.nn.functional.normalize
            row.append(
                torch.cat([unit(summary.float(), dim=0) * (1 - weight) ** 0.5, unit(mean_key, dim=0) * weight**0.5])
            )
        out.append(row)
    return out


def _take_pages(pools, num_pages: int) -> list[int]:
    pages = pools.take(Tier.DEVICE, num_pages)
    assert pages is not None, f"the device pool has no {num_pages} free pages inside a stream's reservation"
    return pages


def _place_frame(
    parts: EngineParts,
    state: StreamState,
    frame: FrameInput,
    pages: list[int],
    fills: list[int],
    summary: torch.Tensor,
    coherence: tuple[float | None, float | None],
    open_after: Callable[..., OpenSums],
    small_of: Callable[[], np.ndarray] | None,
) -> int:
    similarity, cohesion = coherence
    centrality = similarity  # before the frame-block modes override it
    if parts.config.mode.one_frame_units:
        similarity, cohesion = -1.0, None  # frame blocks (token, frame modes): every frame is its own block
    num_tokens = sum(fills)
    decision = state.former.decide(
        timestamp_s=frame.timestamp_s,
        num_tokens=num_tokens,
        similarity=similarity,
        cohesion_after=cohesion,
    )
    frame_index = state.next_frame_index  # reserved by ``ingest`` before the call changed anything
    record = state.former.commit(
        decision, frame_index=frame_index, timestamp_s=frame.timestamp_s, num_tokens=num_tokens
    )
    store_for(parts, state).offer(record.cluster_id, frame_index, frame.timestamp_s, small_of, centrality)
    state.open_sums = open_after(joined=decision.join)
    note_frame(parts, state, record.cluster_id, summary)  # recurring-scene joins (off unless configured)
    slots = parts.tiering.tiers.pools.slots(pages, fills)
    state.push_local(LocalFrame(frame_index, record.cluster_id, frame.timestamp_s, pages, fills, slots))
    state.next_frame_index += 1
    state.frames_ingested += 1
    state.last_timestamp_s = frame.timestamp_s
    offset_s = frame.timestamp_s - state.first_timestamp_s
    state.text_cursor = max(
        state.text_cursor,
        parts.model.frame_position_end(state.geometry, base=state.position_base, offset_s=offset_s),
    )
    return 0 if decision.join else 1


def tokens_of_row(row, features) -> int:
    stream_id, indices, _ = row
    return sum(features[(stream_id, i)][0].shape[0] for i in indices)
