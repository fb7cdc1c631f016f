"""An ingest call's vision tower: its frames' uploads, keyframe thumbnails and tower output, queued per frame size.

With ``config.tower_stream`` on CUDA they are queued on a stream of their own, beside the language model; the
language model's stream waits for them on the device (``TowerWork.read_on``). A batch's tower may be queued ahead of
its ingest call (``EncodedFrames``).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mosaic_core.engine.ingest_pauses import IngestPauses
from mosaic_core.engine.parts import EngineParts
from mosaic_core.engine.results import FrameInput
from mosaic_core.engine.stream import StreamState
from mosaic_core.engine.thumbnails import ThumbnailBatch
from mosaic_core.errors import BudgetError, MosaicError
from mosaic_core.model.geometry import VisionGeometry


@dataclass(frozen=True, slots=True)
class TowerWork:
    """What ``queue_tower`` queued: each frame's ``(embeds, summary, thumbnail maker)`` by ``(stream, frame in the
    batch)``; with a tower stream, the event recorded after the tower and the output tensors the language model
    reads from another stream."""

    features: dict[tuple[str, int], tuple]
    done: torch.cuda.Event | None = None
    outputs: tuple[torch.Tensor, ...] = ()

    def read_on(self, stream: torch.cuda.Stream | None) -> None:
        """Makes ``stream`` wait on the device for the tower (the host does not wait), and marks the outputs used
        by it, so the caching allocator does not give their memory to a later tower before ``stream`` has read
        them."""
        if self.done is None:
            return
        stream.wait_event(self.done)
        for output in self.outputs:
            output.record_stream(stream)


@dataclass(frozen=True, slots=True)
class EncodedFrames:
    """A batch's uploads, keyframe thumbnails and vision tower, queued before its ingest call (``ingest.encode``);
    the call given the same frames of the same streams uses them instead of queuing its own."""

    frames: tuple[FrameInput, ...]
    streams: dict[str, StreamState]  # the stream objects the batch was checked against
    work: TowerWork

    def is_for(self, frames: Sequence[FrameInput], streams: dict[str, StreamState]) -> bool:
        """Whether ``frames`` are this batch's: the same streams (not closed and opened again since), timestamps and
        pixel arrays, in the same order."""
        return (
            len(frames) == len(self.frames)
            and all(
                a.stream_id == b.stream_id and a.timestamp_s == b.timestamp_s and a.rgb is b.rgb
                for a, b in zip(frames, self.frames, strict=True)
            )
            and all(streams.get(stream_id) is state for stream_id, state in self.streams.items())
        )


def queue_tower(parts: EngineParts, by_stream, pauses: IngestPauses | None) -> TowerWork:
    """Vision tower over every frame of the batch, one call per geometry (sources of any size resize into it), or
    with ``pauses.vision_frames`` one call per chunk of that many frames of a geometry; with ``pauses``, each call
    is followed by a pause, and with ``pauses.vision_blocks`` paused inside too. Each call's frames are uploaded
    once, and their keyframe thumbnails made from that upload (``TowerWork``).

    With ``parts.tower_stream`` the uploads, thumbnails and tower are queued there, and everything else (pauses and
    the questions they serve, the window reservations, whose spills wait for the compute queued so far) on the
    stream that was current, the compute stream. The caller makes the stream that runs the language model wait on
    the device for the tower (``TowerWork.read_on``) right before it, and no sooner: work queued meanwhile, such as
    a question's, does not wait for the tower. The tower waits for nothing queued before it: it reads only this
    call's frames and the model's weights.
    """
    groups: dict[VisionGeometry, list[tuple[str, int, np.ndarray]]] = defaultdict(list)
    for stream_id, items in by_stream.items():
        state = parts.streams[stream_id]
        for i, (_, rgb) in enumerate(items):
            if state.geometry is None:
                try:
                    _fix_geometry(parts, state, rgb)
                except MosaicError as err:
                    err.stream_id = stream_id
                    raise
            groups[state.geometry].append((stream_id, i, rgb))
    features, outputs = {}, []
    tower = parts.tower_stream
    compute = None if tower is None else torch.cuda.current_stream(parts.model.device)
    before_block = None
    if pauses is not None and pauses.vision_blocks is not None:
        before_block = _on_stream(compute, functools.partial(pauses.before_vision_block, device=parts.model.device))
    for geometry, members in groups.items():
        step = len(members) if pauses is None or pauses.vision_frames is None else pauses.vision_frames
        for start in range(0, len(members), step):
            chunk = members[start : start + step]
            with torch.cuda.stream(tower):  # None: the current stream
                uploaded = parts.frame_staging.upload([rgb for _, _, rgb in chunk])
                thumbnails = None
                if parts.config.keyframes_per_cluster > 0:  # queued before the tower, read as frames are placed
                    thumbnails = ThumbnailBatch(uploaded, parts.config.keyframe_long_side_px)
                out = parts.model.encode_frames(uploaded, geometry, before_block=before_block)
            outputs += [out.embeds, out.summaries]
            for j, (stream_id, i, _) in enumerate(chunk):
                small_of = None if thumbnails is None else functools.partial(thumbnails.small, j)
                features[(stream_id, i)] = (out.embeds[j], out.summaries[j], small_of)
            if pauses is not None:
                pauses.pause(parts.model.device, in_tower=True)
    if tower is None:
        return TowerWork(features)
    done = torch.cuda.Event()
    done.record(tower)
    return TowerWork(features, done, tuple(outputs))


def _on_stream(stream: torch.cuda.Stream | None, function: Callable) -> Callable:
    """``function`` called with ``stream`` as the current stream (None: whichever is current then)."""

    def on_stream(*args, **kwargs):
        with torch.cuda.stream(stream):
            return function(*args, **kwargs)

    return on_stream


def _fix_geometry(parts: EngineParts, state: StreamState, rgb: np.ndarray) -> None:
    """Chooses a new stream's frame size from its first frame and reserves its window for it. A refusal leaves the
    stream without either, so its next batch is checked again."""
    geometry = parts.model.choose_geometry(*rgb.shape[:2], parts.config.target_tokens_per_frame)
    if geometry.tokens_per_frame > parts.config.formation.max_tokens:
        raise BudgetError(
            f"a frame of stream {state.stream_id!r} has {geometry.tokens_per_frame} tokens, more "
            f"than the cluster size cap formation.max_tokens={parts.config.formation.max_tokens}"
        )
    state.geometry = geometry
    try:
        parts.reserve_window(state)  # now that a frame's size is known
    except BaseException:
        state.geometry = None
        raise
