"""Host chunks allocated ahead of need, on a thread of their own.

Pinning a 256-MiB host chunk page-locks it: tens of milliseconds on a GPU host, which the engine thread spent inside
``PagePools.take`` each time the host pool ran out (100 ms and more at a time at 256 cameras on an H100, while device
windows were copied to host at about 1.1 GB/s). ``ChunkMaker`` allocates a chunk on a daemon thread when the pool
asks for one; the pool adopts the tensor on its own thread when it needs the pages, so the pool's chunks, their
addresses and its free pages are only ever changed there.

    engine thread   take ... free < a chunk: make(next) ............ take needs pages: adopt (wait if not done)
    maker thread                             [ allocate next chunk ]

Another thread's pinning alone does not free the engine thread: ``cudaHostAlloc`` holds the driver's lock while it
faults in and page-locks the chunk, and every CUDA call of the engine thread waits for it. On an H100
(``bench/host_growth.py``, 4 GiB taken at 1.1 GB/s; ``bench/results/h100-host-growth-*.json``) the engine thread's
time in ``take`` fell from 1.72 s to 0.14 s with chunks made ahead, but of its steps (a take, queuing the window's
copy and a matrix product) 15 of 74 were still over 10 ms, up to 222 ms. ``fault_pages_before_pinning`` has torch
fault a chunk's pages in first, outside the driver, and then register them (``cudaHostRegister``), which holds the
lock for far less: then 1 step of 74 was over 10 ms (the first chunk, pinned on the engine thread), p99 15 ms. Since
then the pools ask for their first chunk as they are made (not measured on a GPU since).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
PINNED_BY_REGISTERING = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"


def fault_pages_before_pinning() -> None:
    """Has torch's pinned (host) allocator, for the whole process, fault a block's pages in on 8 threads and then
    page-lock them with ``cudaHostRegister``, in place of ``cudaHostAlloc``. torch unregisters each block the way it
    was pinned, so pinned blocks made before stay valid. Settings made before (``PYTORCH_ALLOC_CONF``) are kept, and
    one that already says how to pin wins: torch resets some settings that a new setting string leaves out."""
    current = _allocator_settings()
    if "pinned_use_cuda_host_register" in current:
        return
    set_settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # private: a torch may lack it
    if set_settings is None:
        log.warning("this torch (%s) cannot change its allocator's settings: host chunks are pinned by cudaHostAlloc, "
                    "which holds the engine thread while it runs; PYTORCH_ALLOC_CONF=%s at the start does what this "
                    "would", torch.__version__, PINNED_BY_REGISTERING)  # fmt: skip
        return
    set_settings(f"{current},{PINNED_BY_REGISTERING}" if current else PINNED_BY_REGISTERING)


def _allocator_settings() -> str:
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)  # torch 2.11 has no getter: the start's, then
    return (
        get()
        if get is not None
        else os.environ.get("PYTORCH_ALLOC_CONF", os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
    )


@dataclass(slots=True)
class HostGrowth:
    """How a host pool grew since it was made (``EngineStats.host_chunks_*``, ``host_grow_wait_s``)."""

    ahead_chunks: int = 0  # chunks made on the maker's thread and adopted
    sync_chunks: int = 0  # chunks allocated on the pool's own thread (up front, or by a take that found none made)
    wait_s: float = 0.0  # seconds takes spent allocating chunks or waiting for one still being made


class ChunkMaker:
    """Runs ``allocate(num_pages)`` for each ``make`` on one daemon thread, started by the first ``make``."""

    def __init__(self, allocate: Callable[[int], torch.Tensor]) -> None:
        self._allocate = allocate
        self._requests: queue.SimpleQueue[tuple[int, Future] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def make(self, num_pages: int) -> Future:
        """Queues one chunk; its future holds the tensor, or the error its allocation raised."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mosaic-host-chunks", daemon=True)
            self._thread.start()
        made: Future = Future()
        self._requests.put((num_pages, made))
        return made

    def close(self) -> None:
        """Makes the chunks queued so far, then stops the thread and joins it."""
        if self._thread is not None:
            self._requests.put(None)
            self._thread.join()
            self._thread = None

    def stop(self) -> None:
        """Has the thread stop once it has made the chunks queued so far, without waiting for it: for pools that are
        gone without a close (their finalizer), whose chunks no one will take."""
        if self._thread is not None:
            self._requests.put(None)
            self._thread = None

    def _run(self) -> None:
        while (request := self._requests.get()) is not None:
            self._make(*request)
            del request  # the chunk is its future's, held by the pool: not by this thread while it waits for the next

    def _make(self, num_pages: int, made: Future) -> None:
        try:
            made.set_result(self._allocate(num_pages))
        except Exception as error:  # handed to the pool, which raises it in the take that needs the pages
            made.set_exception(error)
