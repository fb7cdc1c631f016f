"""``MOSAIC_DECODE_SOURCE=SOURCE python -m services.decode_child FPS LOOP START_OFFSET_S MAX_PIXELS RESUME_AFTER_S``:
a source's sampled frames, on stdout. The source comes in the environment, not the arguments: every user of the host
sees a process's arguments, and a camera URL may carry its password.

The child side of ``services.source_decoding``. It runs ``iter_video_frames(SOURCE, fps=FPS, loop=LOOP == "1",
start_offset_s=START_OFFSET_S, max_pixels=MAX_PIXELS or None, resume_after_s=RESUME_AFTER_S)`` (``none`` for None)
and writes one message per sampled frame, then one for the end or the error:

    message = length (4 bytes, little-endian) + JSON header [+ raw pixels]
    {"t": 12.0, "shape": [272, 640, 3]}  followed by height x width x 3 bytes of RGB
    {"end": true}
    {"error": "InvalidArgumentError", "message": "..."}

A pipe holds 64 KiB on Linux, less than one RGB frame of more than 21,845 pixels (about 148x148), so this process
decodes at most one such frame ahead of what its reader has taken (smaller frames: as many as fit in the pipe).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys

import numpy as np

from mosaic_core.errors import MosaicError
from mosaic_core.model.video import iter_video_frames

LENGTH = struct.Struct("<I")
SOURCE_ENV = "MOSAIC_DECODE_SOURCE"  # the source to open, from the parent's environment rather than the arguments


def write_message(out, header: dict, pixels: np.ndarray | None = None) -> None:
    data = json.dumps(header).encode()
    out.write(LENGTH.pack(len(data)) + data)
    if pixels is not None:
        out.write(memoryview(pixels).cast("B"))
    out.flush()


def main(argv: list[str]) -> int:
    # On stderr, which is the worker's: how far a decode up to a resumed file's position has come.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source = os.environ[SOURCE_ENV]
    fps, loop, start_offset_s, max_pixels = float(argv[0]), argv[1] == "1", float(argv[2]), int(argv[3]) or None
    resume_after_s = None if argv[4] == "none" else float(argv[4])
    out = sys.stdout.buffer
    try:
        try:
            for frame in iter_video_frames(
                source,
                fps=fps,
                loop=loop,
                start_offset_s=start_offset_s,
                max_pixels=max_pixels,
                resume_after_s=resume_after_s,
            ):
                rgb = np.ascontiguousarray(frame.rgb, dtype=np.uint8)
                write_message(out, {"t": frame.timestamp_s, "shape": list(rgb.shape)}, rgb)
        except MosaicError as err:
            write_message(out, {"error": type(err).__name__, "message": str(err)})
            return 0
        except Exception as err:  # the reader shows it as the thread in the worker did: type and message
            write_message(out, {"error": "InvalidFrameError", "message": f"{type(err).__name__}: {err}"})
            return 0
        write_message(out, {"end": True})
    except BrokenPipeError:  # the reader went away (its stream stopped): nothing is left to do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit has nowhere to fail
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
