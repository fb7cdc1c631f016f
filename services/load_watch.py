"""How far a worker's model load has come, told while it runs, by the memory the load has taken so far.

A checkpoint read from network storage can take minutes, and the router gives up on a worker whose start state has
not changed for ``worker_start_timeout_s``. Neither transformers nor safetensors says how far a load has come, so
``LoadWatch`` reads what the load leaves behind: the worker's resident host memory (a loaded weight is resident,
whether read into memory or mapped from its file) and, on CUDA, the memory torch has allocated on the GPU. A load
that moves changes the worker's start state as each tenth of a GiB lands; a load stuck on a read does not, so the
router's timeout still ends it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from mosaic_core.durable.progress import size_text

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SAMPLE_INTERVAL_S = 1.0


def rss_bytes() -> int:
    """Resident memory of this process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def checkpoint_bytes(name_or_path: str) -> int | None:
    """The size of the weight files of a checkpoint directory, or None where ``name_or_path`` is not one (a preset)."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return None
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in CHECKPOINT_SUFFIXES and f.is_file())


class LoadWatch:
    """While its ``with`` block runs, tells ``on_stage`` ``{stage} ({taken so far})`` once a second, whenever the
    memory taken since the block began has moved by a tenth of a GiB, host and GPU apart.

    Args:
        stage: the start stage the load belongs to (``building its engine: loading the model tiny``).
        on_stage: hears each new sentence, on the watch's own thread; none comes after the block has ended.
        checkpoint_bytes: the weight files' size, named in the sentence where known.
        device_bytes: the memory allocated on the load's device (``torch.cuda.memory_allocated``), if it has one.
        host_bytes: the process's resident memory.
        interval_s: how often the watch reads them.
    """

    def __init__(
        self,
        stage: str,
        on_stage: Callable[[str], None],
        *,
        checkpoint_bytes: int | None = None,
        device_bytes: Callable[[], int] | None = None,
        host_bytes: Callable[[], int] = rss_bytes,
        interval_s: float = SAMPLE_INTERVAL_S,
    ) -> None:
        self.stage = stage
        self._on_stage = on_stage
        self._checkpoint_bytes = checkpoint_bytes
        self._device_bytes = device_bytes
        self._host_bytes = host_bytes
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._host_at_start = 0
        self._device_at_start = 0
        self._last_text: str | None = None

    def __enter__(self) -> LoadWatch:
        self._host_at_start = self._host_bytes()
        self._device_at_start = self._device_bytes() if self._device_bytes is not None else 0
        self._last_text = self.text()  # nothing taken yet: the bare stage says as much
        self._on_stage(self.stage)
        self._thread = threading.Thread(target=self._watch, name="model-load-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()  # its last sentence lands before the start's next stage

    def text(self) -> str:
        """The stage with the memory taken so far, in tenths of a GiB, so that it changes only as the load moves:
        ``loading the model /models/q (15.4 GiB of weight files; so far 6.1 GiB of host memory, 2.0 GiB on the GPU)``.
        """
        taken = [f"{_tenths_of_gib(self._host_bytes() - self._host_at_start)} of host memory"]
        if self._device_bytes is not None:
            taken.append(f"{_tenths_of_gib(self._device_bytes() - self._device_at_start)} on the GPU")
        files = "" if self._checkpoint_bytes is None else f"{size_text(self._checkpoint_bytes)} of weight files; "
        return f"{self.stage} ({files}so far {', '.join(taken)})"

    def _watch(self) -> None:
        while not self._stop.wait(self._interval_s):
            text = self.text()
            if text != self._last_text:
                self._last_text = text
                self._on_stage(text)


def _tenths_of_gib(num_bytes: int) -> str:
    return f"{max(num_bytes, 0) / 2**30:.1f} GiB"
