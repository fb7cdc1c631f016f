"""The seconds a question spends scoring candidates and fetching their KV (``Retriever.stage_seconds``)."""

from __future__ import annotations

import time

import torch

from mosaic_core.memory.transfer import TransferEngine


class StageTimer:
    """Stage timers: CUDA events on the device, read once the question's first token is in, so timing a stage never
    makes the host wait for the device; the clock off CUDA. Records nothing unless ``enabled``."""

    def __init__(self, enabled: bool, transfers: TransferEngine) -> None:
        self.enabled = enabled
        self._transfers = transfers
        self._stages: list[tuple[str, object, object]] = []  # (stage, start mark, end mark)

    def mark(self, device: torch.device, *, on_side: bool = False):
        """A stage's start or end: a timing event recorded on the question's stream, or with ``on_side`` on the
        side stream behind the fetches queued there; the clock off CUDA; None unless enabled."""
        if not self.enabled:
            return None
        if device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        side = self._transfers.side
        event.record(side if on_side and side is not None else torch.cuda.current_stream(device))
        return event

    def add(self, stage: str, start, end) -> None:
        if self.enabled:
            self._stages.append((stage, start, end))

    def seconds(self) -> tuple[float, float]:
        """Seconds of scoring and of fetching so far (0 and 0 unless enabled). On CUDA each stage runs from the
        moment the question's stream reaches it to the moment its work is done (the fetches: on the side stream);
        it waits for that work, so read it once the question's first token is in."""
        totals = {"score": 0.0, "fetch": 0.0}
        for stage, start, end in self._stages:
            if isinstance(end, torch.cuda.Event):
                end.synchronize()
                totals[stage] += start.elapsed_time(end) / 1e3
            else:
                totals[stage] += end - start
        return totals["score"], totals["fetch"]
