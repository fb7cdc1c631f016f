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
  not after its last ones: the next pass's first layer, or the call's end, comes soon after them. The host never
  waits for the device at these: the pass's language model is all queued by then, so a question started there
  waits for the same device work either way, and a wait would stop the host placing frames while the device runs
  the language model. Until fb49d23 each waited for the work queued ``lookahead`` pauses back, which from a pass's
  ``lookahead + 1``-th such pause on was the whole language model.

With ``has_work``, a pause where it answers no (no question waits) is passed: the host neither waits for the device
there nor calls ``serve``, so a call in which no question arrives runs as without pauses, the host queuing the whole
language model and placing the pass's frames while the device runs it. A question that arrives then waits, at the next
pause, for the device to catch up with the host to within ``lookahead`` chunks, more than one chunk when the host had
run ahead. On the H200 at 128 cameras this saved 2.6% of the engine alone's pass, nothing measurable in the service,
and made a question's first token about 80 ms later there (bench/NOTES.md, session 17).

On CUDA, what happens at a pause where ``serve`` is called depends on ``alongside``:

- **Off (the host waits; the default).** The host first waits until the device has finished the work queued before
  the ``lookahead``-th pause back (1: the previous one), so it stays at most that many chunks of work ahead of the
  device, and a question started at a pause waits for those chunks, not for the rest of the call. Those chunks stay
  queued while the host waits, so the device idles only where the host needs longer to queue a chunk than the
  device to run them. The waits also keep the host from running ahead through the language model to place the
  pass's frames while the device runs it, as the engine alone, which never pauses, does: in the service on the
  H200 at 128 cameras an ingested frame took 6.7 ms of the engine thread, against 5.0 ms for the engine alone
  (bench/NOTES.md, session 15), but passing the idle pauses did not close that gap (session 17). A larger
  ``lookahead`` lets the host place a pass's frames while the device still runs more of its language model, and
  makes a question started at a pause wait for more of it; neither has been measured on a GPU.
- **On (questions alongside).** The host never waits at a pause. ``serve`` runs on the engine's question stream, a
  high-priority CUDA stream, which first waits for the ingest work its questions read, and for the moves queued so
  far on the side stream. That work is what was queued before the pass under way began (before the call's tower,
  for the first pass: the tower, the uploads and the pass's own pages hold nothing a question reads), or, at a
  pause while placing (where a stream may hold its frames of this pass), everything queued before the pause. So a
  question's prefill runs beside the chunks already queued, ahead of them on the device, instead of behind them.
  After ``serve`` the compute stream waits for the question stream, so the ingest work queued next comes after the
  questions' work. Measured once, on another machine than the default's figure, the service was slower with it:
  9.2 ms of the engine thread a frame, TTFT p50 57 ms against 97 (session 15). Not established why; a suspect is
  that a host that never waits blocks inside kernel launches once the device's queue is full, holding the GIL,
  where a wait at a pause releases it to the worker's other threads (sources decoding video, pushes).

With the vision tower on a CUDA stream of its own (``EngineConfig.tower_stream``), the pauses in and after the tower
never wait for the device, whether ``alongside`` or not: a question started there runs on the compute stream (on the
question stream, ``alongside``), which holds none of the tower's work, so the host goes on queuing the tower while the
previous call's language model still runs. Those pauses leave no mark to wait for either: the first layer pause of
the call's first pass is the next one that does.

What ``serve`` sees and may do: every stream holds the frames of the passes already done in this call, and of the
pass under way only once they are placed (at a pause while placing, the streams placed so far hold theirs, each
stream whole, the others not yet). It may start questions and run their prefill and decode steps, which read slot
tables of their own. It must not ingest, open or close streams, or let an answer end, since an answer's end may
merge or promote clusters while a pass is under way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class IngestPauses:
    """The pauses of one ingest call (module doc); make a new one for each call."""

    serve: Callable[[], None]
    every_layers: int = 4
    has_work: Callable[[], bool] | None = None
    vision_frames: int | None = None
    vision_blocks: int | None = None
    placed_frames: int | None = None
    alongside: bool = False
    lookahead: int = 1
    num_pauses: int = 0
    _placed_since_pause: int = 0
    _reached: PauseMarks = field(init=False, repr=False)
    _question_stream: torch.cuda.Stream | None = field(default=None, repr=False)
    _side: torch.cuda.Stream | None = field(default=None, repr=False)
    _pass_start: torch.cuda.Event | None = field(default=None, repr=False)
    _placing: bool = False
    _passes_begun: int = 0
    _tower_apart: bool = False

    def __post_init__(self) -> None:
        optional = {
            "vision_frames": self.vision_frames,
            "vision_blocks": self.vision_blocks,
            "placed_frames": self.placed_frames,
        }
        if min(self.every_layers, self.lookahead) < 1 or any(v is not None and v < 1 for v in optional.values()):
            raise ValueError(
                f"every_layers={self.every_layers} and lookahead={self.lookahead} must be >= 1, and vision_frames="
                f"{self.vision_frames}, vision_blocks={self.vision_blocks} and placed_frames={self.placed_frames} "
                "None or >= 1"
            )
        self._reached = PauseMarks(self.lookahead)

    def begin_call(
        self, question_stream: torch.cuda.Stream | None, side: torch.cuda.Stream | None, *, tower_apart: bool = False
    ) -> None:
        """The ingest call starts (before its tower): the streams questions run on and follow, when ``alongside``,
        and whether the tower runs on a stream of its own (``tower_apart``)."""
        self._tower_apart = tower_apart
        if self.alongside and question_stream is not None:
            self._question_stream, self._side = question_stream, side
            self._pass_start = _recorded()

    def begin_pass(self) -> None:
        """A forward pass is about to be queued: what the questions of its pauses wait for, until it places frames."""
        if self._question_stream is not None and self._passes_begun > 0:  # the first waits from the call's start
            self._pass_start = _recorded()
        self._passes_begun += 1
        self._placing = False

    def before_layer(self, layer_idx: int, device: torch.device) -> None:
        if layer_idx % self.every_layers == 0:
            self.pause(device)

    def before_vision_block(self, block_idx: int, *, device: torch.device) -> None:
        if self.vision_blocks is not None and block_idx > 0 and block_idx % self.vision_blocks == 0:
            self.pause(device, in_tower=True)

    def placed(self, num_frames: int, *, last_of_pass: bool) -> bool:
        """Counts a pass's frames just placed; says whether to ``pause`` now (``placed_frames`` have been placed
        since the last pause). The caller finishes placing them first: ``serve`` sees each stream whole."""
        self._placing = True
        if self.placed_frames is None:
            return False
        self._placed_since_pause = 0 if last_of_pass else self._placed_since_pause + num_frames
        if self._placed_since_pause < self.placed_frames:
            return False
        self._placed_since_pause = 0
        return True

    def pause(self, device: torch.device, *, in_tower: bool = False) -> None:
        """A pause (module doc); ``in_tower``: inside the vision tower or after it."""
        self.num_pauses += 1
        tower_apart = in_tower and self._tower_apart
        waits = device.type == "cuda" and self._question_stream is None and not self._placing and not tower_apart
        behind = self._reached.push(_recorded()) if waits else None
        if self.has_work is not None and not self.has_work():
            return
        if behind is not None:
            behind.synchronize()
        if self._question_stream is not None:  # alongside, on CUDA
            self._serve_alongside(device)
        else:
            self.serve()

    def _serve_alongside(self, device: torch.device) -> None:
        compute, questions = torch.cuda.current_stream(device), self._question_stream
        questions.wait_event(_recorded() if self._placing else self._pass_start)
        if self._side is not None:
            questions.wait_stream(self._side)
        with torch.cuda.stream(questions):
            self.serve()
        compute.wait_stream(questions)


class PauseMarks:
    """The marks (CUDA events) recorded at the last ``lookahead`` pauses: ``push`` adds this pause's and gives back
    the one the host must wait for, recorded ``lookahead`` pauses back, or None while there are fewer."""

    def __init__(self, lookahead: int) -> None:
        self._marks: deque = deque()
        self.lookahead = lookahead

    def push(self, mark):
        behind = self._marks.popleft() if len(self._marks) >= self.lookahead else None
        self._marks.append(mark)
        return behind


def _recorded() -> torch.cuda.Event:
    """An event recorded on the current stream."""
    event = torch.cuda.Event()
    event.record()
    return event
