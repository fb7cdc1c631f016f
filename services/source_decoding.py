"""A pulled source's sampled frames, decoded in a child process, so the worker's GIL stays with its engine thread.

A source decoded by a thread of the worker holds the worker's GIL for a part of every frame it decodes (PyAV's
Python work between FFmpeg's calls), not only of the frames it samples: at 1 fps from a 25-fps clip, about 1 ms of
GIL a second per camera on a CPU, and 0.24 ms with a child (``python -m bench.gil_threads``; bench/NOTES.md,
session 15). The engine thread, which queues the GPU's work from Python, waits that long. ``iter_frames_in_child`` runs
``iter_video_frames`` in a child process (``services.decode_child``) and yields what it would yield: the same
frames, and the same errors, raised here with their class and sentence. This process only reads each sampled
frame's bytes from a pipe, with the GIL released while it waits.

The child is a plain ``python -m`` process, not a ``multiprocessing`` one, which would import the worker's main
module again (Ray's). It is killed when the iterator is closed or stopped.
"""

from __future__ import annotations

import json
import math
import os
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mosaic_core import errors
from mosaic_core.errors import InvalidFrameError
from mosaic_core.model.video import SampledFrame
from services.decode_child import LENGTH, SOURCE_ENV

POLL_S = 0.2  # how often a read waiting for the child looks at ``stop``
_CODE_ROOT = str(Path(__file__).resolve().parents[1])  # the folder holding ``services`` and ``mosaic_core``


class _Stopped(Exception):
    pass


def iter_frames_in_child(
    source: str,
    *,
    fps: float,
    loop: bool,
    start_offset_s: float,
    max_pixels: int | None = None,
    resume_after_s: float | None = None,
    stop: threading.Event | None = None,
) -> Iterator[SampledFrame]:
    """``iter_video_frames(source, fps=fps, loop=loop, start_offset_s=start_offset_s, max_pixels=max_pixels,
    resume_after_s=resume_after_s)``, decoded in a child process; ends early, without an error, once ``stop`` is
    set."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_CODE_ROOT, os.environ.get("PYTHONPATH")) if p)}
    env[SOURCE_ENV] = source  # not in the arguments, which any user of the host sees: a URL may carry a password
    args = [repr(float(fps)), "1" if loop else "0", repr(float(start_offset_s)), str(max_pixels or 0)]
    args.append("none" if resume_after_s is None else repr(float(resume_after_s)))
    child = subprocess.Popen(
        [sys.executable, "-m", "services.decode_child", *args], stdout=subprocess.PIPE, env=env, bufsize=0
    )
    reader = _Reader(child, stop)
    try:
        while True:
            header = json.loads(reader.read(LENGTH.unpack(reader.read(LENGTH.size))[0]))
            if "shape" in header:
                shape = tuple(header["shape"])
                pixels = np.frombuffer(reader.read(math.prod(shape)), dtype=np.uint8).reshape(shape)
                yield SampledFrame(timestamp_s=float(header["t"]), rgb=pixels)
            elif "error" in header:
                raise _error_class(header["error"])(header["message"])
            else:
                return
    except _Stopped:
        return
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


class _Reader:
    """Exact reads from the child's stdout that give up once ``stop`` is set."""

    def __init__(self, child: subprocess.Popen, stop: threading.Event | None) -> None:
        self.child = child
        self.fd = child.stdout.fileno()
        self.stop = stop

    def read(self, num_bytes: int) -> bytearray:
        data = bytearray(num_bytes)
        view, got = memoryview(data), 0
        while got < num_bytes:
            if self.stop is not None:
                if self.stop.is_set():
                    raise _Stopped
                if not select.select([self.fd], [], [], POLL_S)[0]:
                    continue
            read = os.readv(self.fd, [view[got:]])  # into place, the GIL released while it waits
            if not read:
                code = self.child.wait()
                raise InvalidFrameError(f"the process decoding the source ended unexpectedly (exit code {code})")
            got += read
        return data


def _error_class(name: str) -> type[errors.MosaicError]:
    cls = getattr(errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, errors.MosaicError) else InvalidFrameError
