"""Capturing one engine step in a CUDA graph, the way ``decode_graphs`` and ``prefill_graphs`` both do it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def warm_and_capture(run: Callable[[], torch.Tensor], pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Runs ``run`` twice on a side stream (compiling its kernels; it must be safe to repeat), then captures it
    into a graph whose intermediates live in ``pool`` (``torch.cuda.graph_pool_handle()``); returns the graph and
    the output tensor each replay refills. Raises whatever capturing raises."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = run()
    return graph, out


class GraphPool:
    """A family of graphs sharing one private memory pool (they never replay at once), and how capturing went."""

    def __init__(self, what: str) -> None:
        self.what = what  # what the graphs run, for the log: "decode steps", "question prefills"
        self.failure: str | None = None  # why a capture failed
        self.num_captured = 0
        self.capture_s = 0.0  # host time spent warming up and capturing: the engine waits for it
        self._handle = None

    def capture(self, run: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """``warm_and_capture`` into this pool; None, with the reason logged once and kept, when it fails."""
        started = time.perf_counter()
        try:
            if self._handle is None:
                self._handle = torch.cuda.graph_pool_handle()
            captured = warm_and_capture(run, self._handle)
        except Exception as err:  # a model whose step cannot be captured runs eagerly, as before
            self.failure = f"{type(err).__name__}: {err}"
            log.warning("%s cannot be captured in a CUDA graph, so they run eagerly: %s", self.what, self.failure)
            return None
        self.num_captured += 1
        self.capture_s += time.perf_counter() - started
        return captured
