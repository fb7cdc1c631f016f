"""Pauses inside one ingest call, where its caller may start questions (the service's engine loop does).

An ingest call of a hundred frames holds the engine for about a second on the H200, and a question that arrived
meanwhile waited for all of it before its prefill could start (bench/NOTES.md, session 11). With ``IngestPauses`` the
call stops at fixed points and calls ``serve``:

- after the vision tower, or with ``vision_frames`` after each chunk of that many frames through it;
- with ``vision_blocks``, inside the tower before every that-many-th of its blocks (the first excluded: the pause
  before it is the one that ended the previous work). A block runs over all of the call's frames at once, so
  these pauses leave the tower's kernels as large as without them, unlike frame chunks;
- before every ``every_layers``-th language-model layer of each forward pass, the first included;
- with ``placed_frames``, after every that many frames of a pass placed into clusters once its language model is
  queued (the host's longest stretch without a pause: 350 ms of 650 at 128 cameras on the H200, session 14), but
  not after its last ones: the next pass's first layer, or the call's end, comes soon after them.

On CUDA, at each pause the host first waits until the device has finished the work queued before the previous
pause. So the host stays at most one chunk of work ahead of the device, and a question started at a pause waits for
that one chunk, not for the rest of the call. One chunk stays queued while the host waits, so the device idles only
where the host needs longer to queue a chunk than the device to run the one before: the vision tower is such work
(launch-bound), which is why it is not cut into chunks unless asked. On the H200 at 64 cameras, 32-frame tower
chunks with pauses every 4 layers left the service behind real time where no pauses kept it (bench/NOTES.md,
session 12).

What ``serve`` sees and may do: every stream holds the frames of the passes already done in this call, and of the
pass under way only once they are placed (at a pause while placing, the streams placed so far hold theirs, each
stream whole, the others not yet). It may start questions and run their
prefill and decode steps, which read slot tables of their own. It must not ingest, open or close streams, or let
an answer end, since an answer's end may merge or promote clusters while a pass is under way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class IngestPauses:
    """The pauses of one ingest call (module doc); make a new one for each call."""

    serve: Callable[[], None]
    every_layers: int = 4
    vision_frames: int | None = None
    vision_blocks: int | None = None
    placed_frames: int | None = None
    num_pauses: int = 0
    _placed_since_pause: int = 0
    _previous: torch.cuda.Event | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        optional = {
            "vision_frames": self.vision_frames,
            "vision_blocks": self.vision_blocks,
            "placed_frames": self.placed_frames,
        }
        if self.every_layers < 1 or any(value is not None and value < 1 for value in optional.values()):
            raise ValueError(
                f"every_layers={self.every_layers} must be >= 1, and vision_frames={self.vision_frames}, "
                f"vision_blocks={self.vision_blocks} and placed_frames={self.placed_frames} None or >= 1"
            )

    def before_layer(self, layer_idx: int, device: torch.device) -> None:
        if layer_idx % self.every_layers == 0:
            self.pause(device)

    def before_vision_block(self, block_idx: int, *, device: torch.device) -> None:
        if self.vision_blocks is not None and block_idx > 0 and block_idx % self.vision_blocks == 0:
            self.pause(device)

    def after_placed(self, num_frames: int, *, last_of_pass: bool, device: torch.device) -> None:
        """Counts a pass's frames just placed; pauses once ``placed_frames`` have been since the last pause."""
        if self.placed_frames is None:
            return
        self._placed_since_pause = 0 if last_of_pass else self._placed_since_pause + num_frames
        if self._placed_since_pause >= self.placed_frames:
            self._placed_since_pause = 0
            self.pause(device)

    def pause(self, device: torch.device) -> None:
        if device.type == "cuda":
            reached = torch.cuda.Event()
            reached.record()
            if self._previous is not None:
                self._previous.synchronize()
            self._previous = reached
        self.num_pauses += 1
        self.serve()
