"""What the engine benchmarks feed an engine: the sample clips' frames, looped, and the questions asked."""

from __future__ import annotations

import argparse
import functools

import numpy as np

from mosaic_core.engine.results import FrameInput

QUESTIONS = [
    "When did the cyclist pass the camera?",
    "What happened in the first minutes?",
    "Was there a person near the road?",
    "Summarise the last ten minutes.",
    "When did the car leave?",
]
CLIPS = ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4")


def clip_list(text: str) -> tuple[str, ...]:
    """The sample clips named in ``text`` (comma-separated, each one of ``CLIPS``), as an argparse ``type``: a GPU
    call that carries ``bikes.mp4`` alone names it, where the benches loop the three in turn by default."""
    clips = tuple(c.strip() for c in text.split(",") if c.strip())
    if not clips or not all(c in CLIPS for c in clips):
        raise argparse.ArgumentTypeError(f"{text!r}: name sample clips among {', '.join(CLIPS)}")
    return clips


def looped_frames(seconds: int, *, stream_id: str, clip: str, start_s: float = 0.0):
    """Real sample-clip frames at 1 fps, looped, as engine inputs: what ``iter_video_frames(loop=True)`` gives.

    Decoded once per clip and length in a process. A clip whose 1-fps frames fall on whole seconds and that lasts
    a whole number of them (bikes.mp4: 10 s) repeats exactly, so one pass is decoded and replayed: an hour of one
    camera is then 10 decoded frames, not 360 loops. Other clips are decoded loop by loop.
    """
    return [FrameInput(stream_id, start_s + t, rgb) for t, rgb in _decoded(clip, seconds)]


@functools.lru_cache(maxsize=8)
def _decoded(clip: str, seconds: int) -> list[tuple[float, np.ndarray]]:
    from mosaic_core.model.video import iter_video_frames, probe_video, sample_clip_path

    path = sample_clip_path(clip)
    one_pass = list(iter_video_frames(path, fps=1.0))
    on_whole_seconds = [f.timestamp_s for f in one_pass] == list(range(len(one_pass)))
    if on_whole_seconds and probe_video(path).duration_s == len(one_pass):
        return [(float(i), one_pass[i % len(one_pass)].rgb) for i in range(seconds)]
    return [(f.timestamp_s, f.rgb) for f in iter_video_frames(path, fps=1.0, loop=True, max_frames=seconds)]
