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
    _warm_up(run)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = run()
    return graph, out


def warm_and_capture_pieces(
    run: Callable[[], torch.Tensor], set_cut: Callable, num_pieces: int, pool
) -> tuple[list[torch.cuda.CUDAGraph], torch.Tensor]:
    """``warm_and_capture`` for a ``run`` that is captured as ``num_pieces`` graphs in a row: while capturing,
    ``set_cut`` is given a function that ``run`` calls at each of its ``num_pieces - 1`` cut points, which ends the
    graph under capture and begins the next. Replaying the graphs in order runs ``run``, with the host free between
    them. Returns the graphs and the last one's output tensor."""
    side = _warm_up(run)  # the pieces are captured on the stream they warmed up on
    torch.cuda.synchronize()
    graphs = [torch.cuda.CUDAGraph() for _ in range(num_pieces)]
    capturing = [0]  # the piece under capture

    def cut(*_) -> None:
        graphs[capturing[0]].capture_end()
        capturing[0] += 1
        graphs[capturing[0]].capture_begin(pool=pool, capture_error_mode="thread_local")

    set_cut(cut)
    try:
        with torch.cuda.stream(side):
            graphs[0].capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                out = run()
            finally:
                graphs[capturing[0]].capture_end()
    finally:
        set_cut(None)
    torch.cuda.current_stream().wait_stream(side)
    if capturing[0] != num_pieces - 1:
        raise RuntimeError(f"the run was cut into {capturing[0] + 1} pieces, not {num_pieces}")
    return graphs, out


def _warm_up(run: Callable[[], torch.Tensor]) -> torch.cuda.Stream:
    """Runs ``run`` twice on a side stream, which compiles its kernels before a capture; returns that stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    return side


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
        return self._counted(lambda pool: warm_and_capture(run, pool), 1)

    def capture_pieces(
        self, run: Callable[[], torch.Tensor], set_cut: Callable, num_pieces: int
    ) -> tuple[list[torch.cuda.CUDAGraph], torch.Tensor] | None:
        """``warm_and_capture_pieces`` into this pool; None, as ``capture`` does, when it fails."""
        return self._counted(lambda pool: warm_and_capture_pieces(run, set_cut, num_pieces, pool), num_pieces)

    def _counted(self, capture: Callable, num_graphs: int):
        started = time.perf_counter()
        try:
            if self._handle is None:
                self._handle = torch.cuda.graph_pool_handle()
            captured = capture(self._handle)
        except Exception as err:  # a model whose step cannot be captured runs eagerly, as before
            self.failure = f"{type(err).__name__}: {err}"
            log.warning("%s cannot be captured in a CUDA graph, so they run eagerly: %s", self.what, self.failure)
            return None
        self.num_captured += num_graphs
        self.capture_s += time.perf_counter() - started
        return captured
